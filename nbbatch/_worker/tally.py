"""One worker's live counters, folded from its own events: what progress displays show per worker.

The launcher's `Supervisor` keeps one per worker from the events it receives; a torchrun rank
other than 0 keeps its own (``distributed.PeerSink``) and publishes it between checkpoints, because
its events reach rank 0 only at checkpoints. One fold, so both count the same way. Must not import
torch, DuckDB or anything outside ``_events``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal, NamedTuple, Union

from nbbatch._events import BatchDone, BatchFailed, BatchStarted, Event, Status, WorkerFinished, WorkerReady

__all__ = ["STARTING", "Current", "Tally", "WorkerStatus"]

#: A worker's status before its first event (not a run status: runs start as `Status.RUNNING`).
STARTING: Final = "starting"

WorkerStatus = Union[Status, Literal["starting"]]


class Current(NamedTuple):
    """The batch a worker is in: since when (the worker's clock, ``time.time()``)."""

    global_batch: int
    batch_idx: int
    started: float


@dataclass
class Tally:
    """One worker's totals in the current attempt.

    Attributes:
        done: batches finished (committed or not).
        rows: output rows of those batches.
        failed: batches that raised (errors outside a batch are not counted).
        current: ``(global_batch, batch_idx, started_at)`` of the batch in ``process_batch`` now.
        status: `STARTING`, then `Status.RUNNING`, then the status the worker finished with.

    Example:
        >>> t = Tally()
        >>> t.count(BatchDone(rank=0, global_batch=3, batch_idx=1, rows=8, started_at=0.0, seconds=0.1))
        >>> t.done, t.rows, t.current
        (1, 8, None)
    """

    done: int = 0
    rows: int = 0
    failed: int = 0
    current: Current | None = None
    status: WorkerStatus = STARTING

    def count(self, event: Event) -> None:
        """Fold one of this worker's events in; events that change no counter are ignored."""
        if isinstance(event, BatchStarted):
            self.current = Current(event.global_batch, event.batch_idx, event.t)
            self.status = Status.RUNNING
        elif isinstance(event, BatchDone):
            self.current = None
            self.done += 1
            self.rows += event.rows
        elif isinstance(event, BatchFailed):
            self.current = None
            self.failed += 1 if event.global_batch is not None else 0
        elif isinstance(event, WorkerReady):
            self.status = Status.RUNNING
        elif isinstance(event, WorkerFinished):
            self.status = Status(event.status)
