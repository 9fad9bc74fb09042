"""Rank 0 of a torchrun world: the Supervisor, the store writer, and a flusher thread watching the others.

Rank 0's own events go straight into the `Supervisor`; the other ranks' events arrive at each
checkpoint (``_LeadSink.flush``, a gather on the gloo group) and their live counters through the
c10d store, which a flusher thread reads twice a second before committing. A step is committed only
once every rank's share of it arrived, as with the local launcher. The flusher also turns a fatal
error published by any rank (or a store error, a hung batch, a stop file) into the run's outcome,
and tells every rank through the c10d store.
"""

from __future__ import annotations

import logging
import os
import pickle
import threading
import time
from typing import Any

from nbbatch._errors import (
    NbbatchError,
    RunFailed,
    StoreError,
    WorkerDied,
    WorkerFailed,
)
from nbbatch._events import BatchFailed, Event
from nbbatch._launch.local import _describe_failure, _Signals
from nbbatch._launch.supervisor import Supervisor
from nbbatch._plan import Sharding
from nbbatch._progress import Reporter
from nbbatch._store.control import stop_file
from nbbatch._store.writer import RunRecord, StoreWriter
from nbbatch._worker.collective import Coordinator
from nbbatch._worker.distributed import (
    ABORT_GRACE_SECONDS,
    Channel,
    Counters,
    RemoteFailure,
    exit_later,
)
from nbbatch._worker.loop import WorkerSpec, run_loop

__all__ = ["Lead", "broadcast", "failed", "lost", "sendable", "wait_errors"]

logger = logging.getLogger("nbbatch")

POLL_SECONDS = 0.5


def broadcast(value: Any, group: Any) -> Any:
    """Rank 0's ``value`` on every rank (others pass None)."""
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def sendable(exc: BaseException) -> BaseException:
    """The exception itself if it pickles (same type on every rank), else its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return NbbatchError(f"{type(exc).__name__}: {exc}")


def failed(event: BatchFailed, name: str) -> WorkerFailed:
    """The exception every rank raises for a rank's fatal error, in the local launcher's words."""
    return WorkerFailed(
        _describe_failure(event, name), rank=event.rank, batch_idx=event.batch_idx, global_batch=event.global_batch,
        indices=event.indices, remote_traceback=event.traceback, run_name=name,
    )


def _event(rank: int, exc: BaseException) -> BatchFailed:
    """A failure outside any batch, as an event other ranks can read from the c10d store."""
    return BatchFailed(rank, None, None, (), type(exc).__name__, str(exc), "", True, time.time())


def wait_errors(channel: Channel, me: int, wait: float = 3.0) -> dict[int, BatchFailed]:
    """Errors other ranks published; waits a little, as a broken collective may beat the news."""
    deadline = time.monotonic() + wait
    while True:
        try:
            errors = channel.errors(skip=me)
        except Exception:  # the c10d store is gone too
            return {}
        if errors or time.monotonic() >= deadline:
            return errors
        time.sleep(0.1)


def lost(me: int, exc: BaseException, name: str, silent: list[int] | None = None) -> WorkerDied:
    """A collective broke and no rank said why: one died (signal, out of memory, lost node)."""
    text = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
    who = f"rank {', '.join(map(str, silent))} stopped reporting" if silent else "a rank was probably killed"
    return WorkerDied(
        f"rank {me} lost contact with the other ranks ({type(exc).__name__}: {text}); {who} (signal or out of "
        f"memory?). Run {name!r} is marked failed; resume it with `run_name={name!r}`",
        rank=silent[0] if silent else me, run_name=name,
    )


class _LeadSink:
    """Rank 0's sink: its own events go straight to the Supervisor; the others' arrive at checkpoints."""

    def __init__(self, lead: Lead) -> None:
        self.lead = lead

    def emit(self, event: Event) -> None:
        lead = self.lead
        if lead.abort is not None and lead.own_fatal is None:
            raise RemoteFailure(lead.abort)
        with lead.lock:
            lead.sup.handle(event)
        if isinstance(event, BatchFailed) and event.fatal and lead.own_fatal is None:
            lead.own_fatal = event
            lead.channel.publish_error(0, event)

    def flush(self, coordinator: Coordinator) -> None:
        gathered = coordinator.gather(([], None))
        lead = self.lead
        with lead.lock:
            for rank, (events, counters) in enumerate(gathered or []):
                if rank == 0:
                    continue
                for event in events:
                    lead.sup.handle(event)
                lead.apply(rank, counters, force=True)
        lead.commit()


class Lead:
    """Rank 0: the Supervisor, the store writer, and the flusher thread that watches the others."""

    def __init__(self, config: Any, record: RunRecord, sharding: Sharding, writer: StoreWriter, reporter: Reporter,
                 channel: Channel) -> None:
        self.config = config
        self.record = record
        self.writer = writer
        self.reporter = reporter
        self.channel = channel
        self.world = sharding.world_size
        self.sup = Supervisor(record, sharding)
        self.lock = threading.RLock()  # guards the Supervisor
        self.write_lock = threading.RLock()  # orders commits; guards `result`
        self.fail_lock = threading.Lock()
        self.seq = [-1] * self.world
        self.own_fatal: BatchFailed | None = None
        self.abort: BatchFailed | None = None
        self.result: tuple[str, BaseException | None] | None = None
        self.finished = threading.Event()
        self.stop = threading.Event()
        self.stop_path = stop_file(writer.path, record.run_id)

    # -- state --------------------------------------------------------------------------------
    def apply(self, rank: int, counters: Counters | None, force: bool = False) -> None:
        """Take a rank's own totals (under ``lock``); stale snapshots from the c10d store are ignored."""
        if counters is None or (not force and counters.seq <= self.seq[rank]):
            return
        self.seq[rank] = counters.seq
        self.sup.set_remote_progress(rank, counters.done, counters.rows, counters.failed, counters.current, counters.status)

    def commit(self) -> None:
        """Write what is committable now (complete steps, errors, live progress)."""
        with self.write_lock:
            if self.result is not None:
                return
            with self.lock:
                commit = self.sup.take_commit()
            self.writer.commit(self.record, commit)

    def close_store(self, status: str, error: BaseException | None) -> None:
        """Final commit and status, once; later calls keep the first outcome."""
        with self.write_lock:
            if self.result is not None:
                return
            with self.lock:
                commit = self.sup.take_commit()
                reduced = self.sup.reduced
            try:
                self.writer.commit(self.record, commit)
            except StoreError as exc:  # what was not written is not done: the run is resumable
                status, error = "failed", error or exc
            try:
                self.writer.finish(self.record, status, reduced, str(error) if error is not None else None)
            except StoreError as exc:  # a full disk: `finish` kept the end in the lock file, and says so
                status, error = "failed" if status != "preempted" else status, error or exc
                logger.warning("nbbatch: %s", exc)
            self.result = (status, error)

    def fail(self, events: dict[int, BatchFailed], error: BaseException | None = None) -> None:
        """Record fatal errors (by publishing rank), tell every rank, and leave if we stay stuck."""
        with self.fail_lock:
            if self.abort is not None or self.result is not None:
                return
            first = events[min(events)]
            with self.lock:
                for publisher, event in sorted(events.items()):
                    if event is self.own_fatal:
                        continue
                    # Record the error, but keep a remote rank's counters: they come from its own totals.
                    worker = self.sup.workers[event.rank]
                    saved = (worker.done, worker.rows, worker.failed, worker.current, worker.status)
                    self.sup.handle(event)
                    if event.rank != 0:
                        worker.done, worker.rows, worker.failed, worker.current, worker.status = saved
            try:
                self._read_progress()
            except Exception:  # the c10d store is gone; keep what we have
                pass
            self.close_store("failed", error or failed(first, self.record.name))
            try:
                for publisher in events:
                    self.channel.ack(publisher)
            except Exception:  # the c10d store is gone: nobody waits for the ack any more
                logger.debug("nbbatch: could not acknowledge errors", exc_info=True)
            self.abort = first
            exit_later(self.finished, ABORT_GRACE_SECONDS)

    def fail_here(self, exc: BaseException, event: BatchFailed | None = None) -> None:
        """A failure seen by rank 0 itself (store error, timeout, lost rank): publish it so every rank stops."""
        event = event or _event(0, exc)
        try:
            self.channel.publish_error(0, event)
        except Exception:
            pass
        self.fail({0: event}, exc)

    # -- threads ------------------------------------------------------------------------------
    def _silent(self, after: float = 2.0) -> list[int]:
        """Ranks whose heartbeat in the c10d store is older than ``after`` seconds."""
        try:
            progress = self.channel.read_progress(range(1, self.world))
        except Exception:  # the c10d store is gone too
            return []
        now = time.time()
        return sorted(r for r, c in progress.items() if now - c.t > after and c.status not in ("done", "preempted"))

    def _read_progress(self) -> None:
        progress = self.channel.read_progress(range(1, self.world))
        with self.lock:
            for rank, counters in progress.items():
                self.apply(rank, counters)

    def _poll(self, tick: int) -> None:
        self._read_progress()
        if self.abort is None and self.channel.error_count():
            errors = self.channel.errors(skip=0)
            if errors:
                self.fail(errors)
        if not self.stop.is_set() and os.path.exists(self.stop_path):
            logger.warning("nbbatch: stopping run %r at its next checkpoint", self.record.name)
            self.stop.set()
        timeout = self.config.batch_timeout
        if timeout is not None and self.abort is None:
            with self.lock:
                hung = self.sup.hung(timeout)
            if hung is not None:
                rank, g, k, secs = hung
                indices = self.sup.sharding.indices(g)
                message = (
                    f"worker rank {rank} spent {secs:.0f}s in process_batch at batch_idx {k} (global batch {g}), "
                    f"over batch_timeout={timeout}; run {self.record.name!r} is marked failed, resume it with "
                    f"`run_name={self.record.name!r}`")
                event = BatchFailed(rank, g, k, tuple(indices), "TimeoutError", message, "", True, time.time())
                self.fail_here(WorkerFailed(message, rank=rank, batch_idx=k, global_batch=g, indices=indices,
                                            run_name=self.record.name), event)
        self.commit()
        if tick % 2 == 0 and self.result is None:
            with self.lock:
                snapshot = self.sup.snapshot("running")
            self.reporter.update(snapshot)

    def _flush_loop(self) -> None:
        tick = 0
        while not self.finished.wait(POLL_SECONDS):
            tick += 1
            try:
                self._poll(tick)
            except StoreError as exc:
                self.fail_here(exc)
            except Exception:  # the c10d store went away: the job is ending; the main thread will tell
                logger.debug("nbbatch: flusher stopped", exc_info=True)
                return

    # -- the attempt --------------------------------------------------------------------------
    def run(self, spec: WorkerSpec, local_rank: int, coordinator: Coordinator, group: Any,
            signals: _Signals) -> tuple[str, BaseException | None]:
        flusher = threading.Thread(target=self._flush_loop, daemon=True, name="nbbatch-flush")
        flusher.start()
        consistent = False
        try:
            try:
                run_loop(spec, 0, local_rank, coordinator, _LeadSink(self),
                         lambda: bool(signals.count) or self.stop.is_set())
                if self.own_fatal is None and self.abort is None:
                    _LeadSink(self).flush(coordinator)  # every rank's last events (WorkerFinished)
                    consistent = True
            except RemoteFailure:
                pass  # recorded by the flusher
            except StoreError as exc:
                self.fail_here(exc)
            except Exception as exc:  # a collective broke: a rank failed or died
                errors = wait_errors(self.channel, 0)
                if errors:
                    self.fail(errors)
                else:
                    gone = lost(0, exc, self.record.name, self._silent())
                    self.fail_here(gone, _event(0, gone))
            status, error = self._outcome()
        finally:
            self.finished.set()
            flusher.join(5)
            try:
                with self.lock:
                    snapshot = self.sup.snapshot(self.result[0] if self.result else "failed")
                self.reporter.close(snapshot)
            except Exception:  # a broken display must not lose the outcome
                logger.exception("progress display failed")
            self.writer.close()
            try:
                os.unlink(self.stop_path)
            except FileNotFoundError:
                pass
        if consistent:
            broadcast((status, sendable(error) if error is not None else None), group)
        if self.sup.used_upload_path:
            logger.info("Files stored with default paths are at: %s (rank 0's machine)", self.record.output_dir)
        return status, error

    def _outcome(self) -> tuple[str, BaseException | None]:
        if self.own_fatal is not None and self.result is None:
            self.fail({0: self.own_fatal})
        if self.result is not None:
            return self.result
        sup, name = self.sup, self.record.name
        error: BaseException | None = None
        if sup.too_many_failures:
            status = "failed"
            error = RunFailed(
                f"run {name!r} skipped more failing batches than max_failures allows; see "
                f"`nbbatch.open_run({name!r}).errors()` and resume with `run_name={name!r}`"
            )
        elif len(sup.finished) == self.world and all(s == "done" for s in sup.finished.values()):
            status = "done"
        elif sup.finished and all(s == "preempted" for s in sup.finished.values()):
            status = "preempted"
        else:
            status = "failed"
            error = NbbatchError(f"run {name!r} ended in an unexpected state {sup.finished}; resume it with `run_name={name!r}`")
        self.close_store(status, error)
        assert self.result is not None
        return self.result
