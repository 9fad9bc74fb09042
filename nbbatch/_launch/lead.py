"""Rank 0 of a torchrun world: the transport that moves every rank's events into the `Lifecycle`.

Rank 0's own events go straight into the `Lifecycle`; the other ranks' events arrive at each
checkpoint (``_LeadSink.flush``, a gather on the gloo group). Their live counters and segment
manifests come through the c10d store, which a flusher thread reads twice a second before
committing. A step is committed only once every rank's share of it arrived, with the segments
holding its outputs, as with the local launcher. The flusher also turns a fatal error published by
any rank (or a store error, a hung batch, a stop file) into the run's outcome, and tells every rank
through the c10d store.
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from typing import Any

from nbbatch._errors import NbbatchError, StoreError, WorkerDied
from nbbatch._events import BatchFailed, Event, Status
from nbbatch._launch.lifecycle import FLUSH_SECONDS, Lifecycle, Signals, worker_failed
from nbbatch._worker.collective import Coordinator
from nbbatch._worker.distributed import (
    ABORT_GRACE_SECONDS,
    Channel,
    Counters,
    RemoteFailure,
    exit_later,
)
from nbbatch._worker.loop import WorkerSpec, failure, run_loop
from nbbatch._worker.tally import Tally

__all__ = ["Lead", "broadcast", "lost", "sendable", "wait_errors"]

logger = logging.getLogger("nbbatch")

ERRORS_WAIT_SECONDS = 3.0  # a broken collective may beat the news of the error that broke it
ERRORS_POLL_SECONDS = 0.1
SILENT_SECONDS = 2.0  # a rank whose heartbeat is older than this stopped reporting
FLUSHER_JOIN_SECONDS = 5.0
MESSAGE_CHARS = 160  # of a broken collective's message, in `lost`'s error


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


def wait_errors(channel: Channel, me: int, wait: float = ERRORS_WAIT_SECONDS) -> dict[int, BatchFailed]:
    """Errors other ranks published; waits a little, as a broken collective may beat the news."""
    deadline = time.monotonic() + wait
    while True:
        try:
            errors = channel.errors(skip=me)
        except Exception:  # the c10d store is gone too
            return {}
        if errors or time.monotonic() >= deadline:
            return errors
        time.sleep(ERRORS_POLL_SECONDS)


def lost(me: int, exc: BaseException, name: str, silent: list[int] | None = None) -> WorkerDied:
    """A collective broke and no rank said why: one died (signal, out of memory, lost node)."""
    text = str(exc).splitlines()[0][:MESSAGE_CHARS] if str(exc) else type(exc).__name__
    who = f"rank {', '.join(map(str, silent))} stopped reporting" if silent else "a rank was probably killed"
    return WorkerDied(
        f"rank {me} lost contact with the other ranks ({type(exc).__name__}: {text}); {who} (signal or out of "
        f"memory?). Run {name!r} is marked failed; resume it with `run_name={name!r}`",
        rank=silent[0] if silent else me, run_name=name,
    )


class _LeadSink:
    """Rank 0's sink: its own events go straight to the Lifecycle; the others' arrive at checkpoints."""

    def __init__(self, lead: Lead) -> None:
        self.lead = lead

    def emit(self, event: Event) -> None:
        lead = self.lead
        if lead.abort is not None and lead.own_fatal is None:
            raise RemoteFailure(lead.abort)
        lead.life.handle(event)
        if isinstance(event, BatchFailed) and event.fatal and lead.own_fatal is None:
            lead.own_fatal = event
            lead.channel.publish_error(0, event)

    def flush(self, coordinator: Coordinator) -> None:
        gathered = coordinator.gather(([], None))
        lead = self.lead
        with lead.life.lock:
            for rank, (events, counters) in enumerate(gathered or []):
                if rank == 0:
                    continue
                for event in events:
                    lead.life.sup.handle(event)
                lead.apply(rank, counters, force=True)
        lead.collect_segments()  # with the counters just gathered; reads the c10d store, so outside the lock
        lead.life.flush(report=False)


class Lead:
    """Rank 0: the `Lifecycle`, and the flusher thread that watches the other ranks."""

    def __init__(self, life: Lifecycle, channel: Channel) -> None:
        self.life = life
        self.channel = channel
        self.world = life.sup.sharding.world_size
        self.fail_lock = threading.Lock()
        self.seq = [-1] * self.world
        self.published: dict[int, int] = {}  # segment manifests each rank published, by its counters
        self.own_fatal: BatchFailed | None = None
        self.abort: BatchFailed | None = None
        self.finished = threading.Event()
        self.stop = threading.Event()

    # -- state --------------------------------------------------------------------------------
    def apply(self, rank: int, counters: Counters | None, force: bool = False) -> None:
        """Take a rank's own totals (under the lifecycle's lock); stale c10d snapshots are ignored."""
        if counters is None or (not force and counters.seq <= self.seq[rank]):
            return
        self.seq[rank] = counters.seq
        self.published[rank] = max(self.published.get(rank, 0), counters.segments)
        self.life.sup.set_remote_progress(rank, counters.tally())

    def collect_segments(self) -> None:
        """Take the segment manifests other ranks' counters say they published (their steps may commit now)."""
        with self.life.lock:
            published = dict(self.published)
        for event in self.channel.read_segments(published):
            self.life.handle(event)

    def fail(self, events: dict[int, BatchFailed], error: BaseException | None = None) -> None:
        """Record fatal errors (by publishing rank), store the end, tell every rank, leave if stuck."""
        with self.fail_lock:
            if self.abort is not None or self.life.result is not None:
                return
            first = events[min(events)]
            self._record(events)
            try:
                self._read_progress()
                self.collect_segments()  # the steps every rank finished still commit
            except Exception:  # the c10d store is gone; keep what we have
                pass
            self.life.finish(Status.FAILED, error or worker_failed(first, self.life.name))
            try:
                for publisher in events:
                    self.channel.ack(publisher)
            except Exception:  # the c10d store is gone: nobody waits for the ack any more
                logger.debug("nbbatch: could not acknowledge errors", exc_info=True)
            self.abort = first
            exit_later(self.finished, ABORT_GRACE_SECONDS)

    def _record(self, events: dict[int, BatchFailed]) -> None:
        """Add other ranks' fatal events to the errors, keeping their counters (from their own totals)."""
        with self.life.lock:
            for event in (e for _, e in sorted(events.items()) if e is not self.own_fatal):
                worker = self.life.sup.workers[event.rank]
                saved = Tally(worker.done, worker.rows, worker.failed, worker.current, worker.status)
                self.life.sup.handle(event)
                if event.rank != 0:
                    self.life.sup.set_remote_progress(event.rank, saved)

    def fail_here(self, exc: BaseException, event: BatchFailed | None = None) -> None:
        """A failure seen by rank 0 itself (store error, timeout, lost rank): publish it so every rank stops."""
        event = event or failure(0, exc)
        try:
            self.channel.publish_error(0, event)
        except Exception:
            pass
        self.fail({0: event}, exc)

    # -- threads ------------------------------------------------------------------------------
    def _silent(self, after: float = SILENT_SECONDS) -> list[int]:
        """Ranks whose heartbeat in the c10d store is older than ``after`` seconds."""
        try:
            progress = self.channel.read_progress(range(1, self.world))
        except Exception:  # the c10d store is gone too
            return []
        now = time.time()
        return sorted(r for r, c in progress.items()
                      if now - c.t > after and c.status not in (Status.DONE, Status.PREEMPTED))

    def _read_progress(self) -> None:
        progress = self.channel.read_progress(range(1, self.world))
        with self.life.lock:
            for rank, counters in progress.items():
                self.apply(rank, counters)

    def _poll(self, tick: int, signals: Signals) -> None:
        self._read_progress()
        self.collect_segments()
        if self.abort is None and self.channel.error_count():
            errors = self.channel.errors(skip=0)
            if errors:
                self.fail(errors)
        if self.life.wants_stop(signals):
            self.stop.set()
        hung = self.life.hung() if self.abort is None else None
        if hung is not None:
            error = self.life.hung_error(hung)
            event = BatchFailed(hung.rank, hung.global_batch, hung.batch_idx, tuple(error.indices), "TimeoutError",
                                str(error), "", True, time.time())
            self.fail_here(error, event)
        self.life.flush(report=tick % 2 == 0)

    def _flush_loop(self, signals: Signals) -> None:
        tick = 0
        while not self.finished.wait(FLUSH_SECONDS):
            tick += 1
            try:
                self._poll(tick, signals)
            except StoreError as exc:
                self.fail_here(exc)
            except Exception:  # the c10d store went away: the job is ending; the main thread will tell
                logger.debug("nbbatch: flusher stopped", exc_info=True)
                return

    # -- the attempt --------------------------------------------------------------------------
    def run(self, spec: WorkerSpec, local_rank: int, coordinator: Coordinator,
            signals: Signals) -> tuple[Status, BaseException | None, bool]:
        """Run rank 0's loop while the flusher watches; ``(status, error, every rank agrees)``."""
        flusher = threading.Thread(target=self._flush_loop, args=(signals,), daemon=True, name="nbbatch-flush")
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
                self._broken(exc)
            status, error = self._outcome()
        finally:
            self.finished.set()
            flusher.join(FLUSHER_JOIN_SECONDS)
            self.life.close()
        return status, error, consistent

    def _broken(self, exc: BaseException) -> None:
        """A collective broke: fail with the error a rank published, or say which rank went silent."""
        errors = wait_errors(self.channel, 0)
        if errors:
            self.fail(errors)
        else:
            gone = lost(0, exc, self.life.name, self._silent())
            self.fail_here(gone, failure(0, gone))

    def _outcome(self) -> tuple[Status, BaseException | None]:
        if self.own_fatal is not None and self.life.result is None:
            self.fail({0: self.own_fatal})
        if self.life.result is not None:
            return self.life.result
        return self.life.finish(*self.life.decide(self.world))
