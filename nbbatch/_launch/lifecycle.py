"""One run's lifecycle, shared by both transports: begin, take events, decide, finish, conclude.

A transport only moves events: ``local.py`` reads them from worker pipes and watches the worker
processes; ``lead.py`` (rank 0 under torchrun) gathers them over torch.distributed and reads live
counters from the c10d store. Each hands events to `Lifecycle.handle` and reports what only it can
see (a dead worker, a broken collective) with `Lifecycle.fail`. Everything the store and the caller
see — commits, the final status and its error, the display's last line, the exception raised and
the exit code — is decided here, once for both.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any

from nbbatch._errors import NbbatchError, RunFailed, StoreError, WorkerFailed
from nbbatch._events import BatchFailed, Event, Status
from nbbatch._launch.supervisor import Hung, Supervisor
from nbbatch._plan import Sharding
from nbbatch._progress import Reporter
from nbbatch._store.control import clear_stop, stop_file
from nbbatch._store.records import RunRecord, RunSpec
from nbbatch._store.writer import StoreWriter

__all__ = [
    "FLUSH_SECONDS",
    "Lifecycle",
    "Signals",
    "begin",
    "conclude",
    "describe_failure",
    "worker_failed",
]

logger = logging.getLogger("nbbatch")

FLUSH_SECONDS = 0.5  # live progress reaches the store about twice a second


class Signals:
    """Counts SIGINT/SIGTERM while a run is live (main thread only); restores handlers on exit.

    The first asks for a stop at the next checkpoint (the run ends ``preempted``); a second one
    stops at once. `conclude` turns a counted signal into the caller's ``KeyboardInterrupt`` or
    exit code 143, after the store has the outcome.
    """

    def __init__(self) -> None:
        self.count = 0
        self.last: int | None = None

    def note(self, signum: int, frame: Any = None) -> None:
        """Count one signal (the handler; also called for a ``KeyboardInterrupt`` caught off the main thread)."""
        self.count += 1
        self.last = signum

    @contextmanager
    def installed(self) -> Iterator[Signals]:
        """Count SIGINT and SIGTERM instead of dying, for the duration of the block."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.note) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def describe_failure(event: BatchFailed, name: str) -> str:
    """Where and why a worker failed, and how to resume (the message of `WorkerFailed`)."""
    if event.global_batch is None:
        where = f"worker rank {event.rank} failed outside a batch"
    else:
        idx = event.indices
        span = f"{idx[0]}..{idx[-1]}" if idx else "none"
        where = (
            f"worker rank {event.rank} failed in process_batch at batch_idx {event.batch_idx} "
            f"(global batch {event.global_batch}, dataset indices {span})"
        )
    return (
        f"{where}: {event.exc_type}: {event.message}. Run {name!r} is marked failed; fix the cause and "
        f"resume it with `run_name={name!r}` (committed batches are kept)"
    )


def worker_failed(event: BatchFailed, name: str) -> WorkerFailed:
    """The exception the caller (every rank, under torchrun) raises for a worker's fatal error."""
    return WorkerFailed(
        describe_failure(event, name), rank=event.rank, batch_idx=event.batch_idx, global_batch=event.global_batch,
        indices=event.indices, remote_traceback=event.traceback, run_name=name,
    )


def begin(store: str, spec: RunSpec) -> tuple[StoreWriter, RunRecord]:
    """Open the store and create or resume the run; a run already done is returned with the store closed."""
    writer = StoreWriter(store)
    try:
        record = writer.begin(spec)
        clear_stop(writer.path, record.run_id)
    except BaseException:
        writer.close()
        raise
    if record.status == Status.DONE:
        logger.info("run %r is already done in %s; returning it as is", record.name, store)
        writer.close()
    return writer, record


def conclude(status: Status, error: BaseException | None, signals: Signals, name: str) -> None:
    """Raise what the caller must see once the outcome is stored: the run's error, or the signal."""
    if error is not None:
        raise error
    if signals.count and status == Status.PREEMPTED:
        if signals.last == signal.SIGINT:
            # A plain KeyboardInterrupt: an uncaught one (and only that exact type) makes Python exit by
            # SIGINT, as a shell and a batch system expect of a Ctrl-C'd script.
            raise KeyboardInterrupt(f"run {name!r} preempted and committed; resume with run_name={name!r}")
        sys.exit(128 + signal.SIGTERM)


class Lifecycle:
    """One attempt of one run, as the store's writer sees it.

    Thread-safe where torchrun's rank 0 needs it: its flusher thread commits and fails the run
    while the main thread runs rank 0's own loop.
    """

    def __init__(self, record: RunRecord, sharding: Sharding, writer: StoreWriter, reporter: Reporter,
                 batch_timeout: float | None) -> None:
        self.record = record
        self.writer = writer
        self.reporter = reporter
        self.batch_timeout = batch_timeout
        self.sup = Supervisor(record, sharding)
        self.lock = threading.RLock()  # guards `sup`
        self._end_lock = threading.RLock()  # orders commits against the end; guards `result`
        self.error: BaseException | None = None
        self.stop_requested = False
        self.hard_stop = False
        self.result: tuple[Status, BaseException | None] | None = None
        self.stop_path = stop_file(writer.path, record.run_id)

    @property
    def name(self) -> str:
        """The run's name, for messages."""
        return self.record.name

    # -- during the attempt -----------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        """Apply one worker event."""
        with self.lock:
            self.sup.handle(event)

    def fail(self, error: BaseException) -> None:
        """Record why the run fails; the first error wins."""
        if self.error is None:
            self.error = error

    def check(self) -> BaseException | None:
        """The run's error so far: one recorded, a worker's fatal event, or a hung batch."""
        if self.error is None and self.sup.fatal is not None:
            self.fail(worker_failed(self.sup.fatal, self.name))
        if self.error is None:
            hung = self.hung()
            if hung is not None:
                self.fail(self.hung_error(hung))
        return self.error

    def hung(self) -> Hung | None:
        """A batch over ``batch_timeout``, if any."""
        if self.batch_timeout is None:
            return None
        with self.lock:
            return self.sup.hung(self.batch_timeout)

    def hung_error(self, hung: Hung) -> WorkerFailed:
        """The error that fails a run whose batch ran over ``batch_timeout``."""
        message = (
            f"worker rank {hung.rank} spent {hung.seconds:.0f}s in process_batch at batch_idx {hung.batch_idx} "
            f"(global batch {hung.global_batch}), over batch_timeout={self.batch_timeout}; run {self.name!r} is "
            f"marked failed, resume it with `run_name={self.name!r}`"
        )
        return WorkerFailed(message, rank=hung.rank, batch_idx=hung.batch_idx, global_batch=hung.global_batch,
                            indices=self.sup.sharding.indices(hung.global_batch), run_name=self.name)

    def wants_stop(self, signals: Signals) -> bool:
        """True once, when a signal or a stop request (`Run.stop`, the dashboard) first asks for a stop."""
        if self.stop_requested or not (signals.count or os.path.exists(self.stop_path)):
            return False
        self.stop_requested = True
        logger.warning("nbbatch: stopping run %r at its next checkpoint (interrupt again to stop now)", self.name)
        return True

    def flush(self, report: bool = True) -> None:
        """Commit what is committable (complete steps, errors, live progress); a no-op once ended.

        Raises:
            StoreError: the store refused the commit (a full disk); nothing of it was written.
        """
        with self._end_lock:
            if self.result is not None:
                return
            with self.lock:
                commit = self.sup.take_commit()
            self.writer.commit(self.record, commit)
        if report:
            self.report()

    def report(self) -> None:
        """Show live progress."""
        with self.lock:
            snapshot = self.sup.snapshot(Status.RUNNING)
        self.reporter.update(snapshot)

    # -- the end --------------------------------------------------------------------------------
    def decide(self, world: int) -> tuple[Status, BaseException | None]:
        """The attempt's status and error once its ``world`` workers are done with it."""
        finished = self.sup.finished
        if self.error is not None:
            return Status.FAILED, self.error
        if self.sup.too_many_failures:
            return Status.FAILED, RunFailed(
                f"run {self.name!r} skipped more failing batches than max_failures allows; see "
                f"`nbbatch.open_run({self.name!r}).errors()` and resume with `run_name={self.name!r}`"
            )
        if self.hard_stop or (self.stop_requested and all(s == Status.PREEMPTED for s in finished.values())):
            return Status.PREEMPTED, None
        if len(finished) == world and all(s == Status.DONE for s in finished.values()):
            return Status.DONE, None
        if finished and all(s == Status.PREEMPTED for s in finished.values()):
            return Status.PREEMPTED, None
        return Status.FAILED, NbbatchError(
            f"run {self.name!r} ended in an unexpected state {finished}; resume it with `run_name={self.name!r}`"
        )

    def finish(self, status: Status, error: BaseException | None) -> tuple[Status, BaseException | None]:
        """Store the last commit and the final status, once; later calls return the first outcome.

        What the store refuses (a full disk) becomes the run's error, unless it already has one;
        `StoreWriter.finish` then keeps the status in the lock file, where readers find it.
        """
        with self._end_lock:
            if self.result is not None:
                return self.result
            with self.lock:
                commit = self.sup.take_commit()
                reduced = self.sup.reduced
            try:
                self.writer.commit(self.record, commit)
            except StoreError as exc:  # what was not written is not done: the run stays resumable
                status, error = Status.FAILED, error or exc
            try:
                self.writer.finish(self.record, status, reduced, str(error) if error is not None else None)
            except StoreError as exc:
                if error is not None:
                    logger.warning("nbbatch: %s", exc)
                status = status if status == Status.PREEMPTED else Status.FAILED
                error = error or exc
            self.result = (status, error)
            return self.result

    def close(self) -> None:
        """Show the last line, drop the stop request, and say where `upload_path` files went."""
        status = self.result[0] if self.result is not None else Status.FAILED
        try:
            with self.lock:
                snapshot = self.sup.snapshot(status)
            self.reporter.close(snapshot)
        except Exception:  # a broken display must not lose the outcome
            logger.exception("progress display failed")
        with suppress(FileNotFoundError):
            os.unlink(self.stop_path)
        if self.sup.used_upload_path:
            logger.info("Files stored with default paths are at: %s", self.record.output_dir)

