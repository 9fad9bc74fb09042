"""Folds worker events into exactly-once commits, live progress and the run's outcome.

A worker's batches become committable when that worker reports the checkpoint that follows
them; a checkpoint step is committed once every worker reported it. Pipes are FIFO per worker,
so "everything before CheckpointDone(step)" is exactly that worker's share of the step.
Pure state, clock passed in; no processes, no DuckDB.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from nbbatch._events import (
    BatchDone,
    BatchFailed,
    CheckpointDone,
    Event,
    Reduced,
    SegmentWritten,
    Status,
    WorkerFinished,
    WorkerReady,
)
from nbbatch._plan import Sharding
from nbbatch._progress import ProgressSnapshot, RateMeter, WorkerProgress
from nbbatch._store.records import Commit, CommittedBatch, LogRow, MetricRow, ProgressRow, ReducerStates, RunRecord
from nbbatch._worker.tally import Tally

__all__ = ["Hung", "Supervisor"]


@dataclass
class _Share:
    """One worker's events since its last checkpoint."""

    batches: list[BatchDone] = field(default_factory=list)
    metrics: list[MetricRow] = field(default_factory=list)
    awaits_segment: bool = False  # the worker writes this share's outputs as a segment
    segment: SegmentWritten | None = None  # its manifest, once written: committed with the share


class Hung(NamedTuple):
    """A batch running longer than ``batch_timeout``."""

    rank: int
    global_batch: int
    batch_idx: int
    seconds: float


@dataclass
class _Worker(Tally):
    """One worker's counters (`Tally`, the same fold a torchrun peer keeps) and what it has to do."""

    rank: int = 0
    todo: int = 0
    pid: int | None = None


class Supervisor:
    """The launcher's view of one attempt."""

    def __init__(self, record: RunRecord, sharding: Sharding, clock: Callable[[], float] = time.time) -> None:
        self.record = record
        self.sharding = sharding
        self.clock = clock
        self.started = clock()
        self.committed: set[int] = set(record.done)
        self.workers = [_Worker(rank=r, todo=len(sharding.todo(r, record.done))) for r in range(sharding.world_size)]
        self.shares = [_Share() for _ in range(sharding.world_size)]
        self.ready: dict[int, dict[int, tuple[_Share, tuple[bytes, ...]]]] = {}
        self.early_segments: dict[tuple[int, int], SegmentWritten] = {}
        self.errors: list[BatchFailed] = []
        self.loose_metrics: list[MetricRow] = []
        self.fatal: BatchFailed | None = None
        self.reduced: dict[str, Any] | None = None
        self.finished: dict[int, Status] = {}
        self.too_many_failures = False
        self.stop_agreed = False
        self.used_upload_path = False
        self.recent_errors: deque[str] = deque(maxlen=20)
        self.last_metrics: dict[str, Any] = {}
        self.meter = RateMeter(clock=clock)
        self._dirty = True
        self._last_log: tuple[int, int, int] | None = None

    # -- events ---------------------------------------------------------------------------------
    def handle(self, event: Event) -> None:
        """Apply one worker event."""
        self._dirty = True
        rank = getattr(event, "rank", None)
        if rank is not None and rank < len(self.workers):
            self.workers[rank].count(event)
        handler = _HANDLERS.get(type(event))
        if handler is not None:
            handler(self, event)

    def _done(self, event: BatchDone) -> None:
        self.shares[event.rank].batches.append(event)
        for m in event.metrics:
            self.shares[event.rank].metrics.append(MetricRow(event.rank, event.global_batch, event.batch_idx, m))
            self.last_metrics.update(dict(m.metrics))

    def _failed(self, event: BatchFailed) -> None:
        self.errors.append(event)
        where = f"batch_idx {event.batch_idx}" if event.batch_idx is not None else "outside a batch"
        self.recent_errors.append(f"rank {event.rank}, {where}: {event.exc_type}: {event.message}")
        if event.fatal and self.fatal is None:
            self.fatal = event

    def _checkpoint(self, event: CheckpointDone) -> None:
        rank = event.rank
        share, self.shares[rank] = self.shares[rank], _Share()
        share.metrics.extend(MetricRow(rank, None, None, m) for m in event.metrics)
        share.awaits_segment = event.segment
        share.segment = self.early_segments.pop((event.step, rank), None)
        self.ready.setdefault(event.step, {})[rank] = (share, event.reducer_states)
        self.too_many_failures |= event.failed
        self.stop_agreed |= event.stop

    def _segment(self, event: SegmentWritten) -> None:
        ready = self.ready.get(event.step, {}).get(event.rank)
        if ready is not None:
            ready[0].segment = event
        else:  # before its checkpoint: a torchrun peer's manifest comes by the c10d store, its checkpoint by a gather
            self.early_segments[(event.step, event.rank)] = event

    def _reduced(self, event: Reduced) -> None:
        self.reduced = dict(event.metrics)

    def _finished(self, event: WorkerFinished) -> None:
        self.finished[event.rank] = Status(event.status)
        self.used_upload_path |= event.used_upload_path
        self.loose_metrics.extend(MetricRow(event.rank, None, None, m) for m in event.metrics)

    def _ready(self, event: WorkerReady) -> None:
        self.workers[event.rank].pid = event.pid

    # -- outputs --------------------------------------------------------------------------------
    def take_commit(self) -> Commit:
        """Everything that may be written now: complete checkpoint steps plus live progress."""
        commit = Commit()
        world = self.sharding.world_size
        for step in sorted(self.ready):
            shares = self.ready[step]
            if len(shares) < world or any(s.awaits_segment and s.segment is None for s, _ in shares.values()):
                break  # a step commits whole: every rank's share, and the segments holding its outputs
            del self.ready[step]
            for rank, (share, states) in sorted(shares.items()):
                for b in share.batches:
                    if b.global_batch in self.committed:
                        continue  # never write a batch twice, whatever a worker sends
                    self.committed.add(b.global_batch)
                    commit.batches.append(CommittedBatch(b, self.sharding.indices(b.global_batch).start))
                commit.metrics.extend(share.metrics)
                commit.reducer_states[rank] = ReducerStates(step, states)
                if share.segment is not None:
                    commit.segments.append(share.segment)
        commit.metrics.extend(self.loose_metrics)
        self.loose_metrics = []
        commit.errors, self.errors = self.errors, []
        if self._dirty:
            self._dirty = False
            commit.progress = [
                ProgressRow(w.rank, w.done, w.rows, w.failed, w.todo, w.current.global_batch if w.current else None, w.status)
                for w in self.workers
            ]
            totals = (self.done_batches, sum(w.rows for w in self.workers), len(self.committed))
            if totals != self._last_log:
                self._last_log = totals
                commit.log = LogRow(self.clock(), *totals)
        return commit

    @property
    def done_batches(self) -> int:
        """Batches finished so far, committed before this attempt or processed in it."""
        return len(self.record.done) + sum(w.done for w in self.workers)

    def set_remote_progress(self, rank: int, tally: Tally) -> None:
        """Overwrite a worker's live counters with its own totals (torchrun ranks report them between checkpoints)."""
        worker = self.workers[rank]
        worker.done, worker.rows, worker.failed = tally.done, tally.rows, tally.failed
        worker.current, worker.status = tally.current, tally.status
        self._dirty = True

    def hung(self, timeout: float) -> Hung | None:
        """A batch running longer than ``timeout`` seconds, if any."""
        now = self.clock()
        for w in self.workers:
            if w.current is not None and now - w.current.started > timeout:
                return Hung(w.rank, w.current.global_batch, w.current.batch_idx, now - w.current.started)
        return None

    def snapshot(self, status: str) -> ProgressSnapshot:
        """Numbers for progress displays."""
        rows = sum(w.rows for w in self.workers)
        self.meter.add(rows)
        rate = self.meter.rate()
        elapsed = self.clock() - self.started
        if status != "running" and elapsed > 0:
            rate = rows / elapsed  # the final line shows the whole attempt's average
        remaining_batches = self.sharding.real_batches - self.done_batches - sum(w.failed for w in self.workers)
        eta = self.meter.eta(remaining_batches * self.sharding.batch_size) if rate else None
        return ProgressSnapshot(
            run_name=self.record.name,
            run_id=self.record.run_id,
            status=Status(status),
            total_batches=self.sharding.real_batches,
            done_batches=self.done_batches,
            committed_batches=len(self.committed),
            failed_batches=sum(w.failed for w in self.workers),
            rows=rows,
            elapsed=elapsed,
            rate=rate,
            eta=eta,
            workers=tuple(WorkerProgress(w.rank, w.done, w.todo, w.failed, w.status) for w in self.workers),
            metrics=dict(self.last_metrics),
            errors=tuple(self.recent_errors),
            activity=self._activity(status),
        )

    def _activity(self, status: str) -> str:
        """What a live display should say the run waits for: workers that have not started yet."""
        starting = sum(1 for w in self.workers if w.status == "starting")
        if status != "running" or not starting:
            return ""
        return f"starting {starting} worker{'s' if starting != 1 else ''}"


_HANDLERS: dict[type, Callable[[Supervisor, Any], None]] = {
    BatchDone: Supervisor._done,
    BatchFailed: Supervisor._failed,
    CheckpointDone: Supervisor._checkpoint,
    SegmentWritten: Supervisor._segment,
    Reduced: Supervisor._reduced,
    WorkerFinished: Supervisor._finished,
    WorkerReady: Supervisor._ready,
}
