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
from typing import Any

from nbbatch._events import (
    BatchDone,
    BatchFailed,
    BatchStarted,
    CheckpointDone,
    Event,
    MetricRecord,
    Reduced,
    SegmentWritten,
    WorkerFinished,
    WorkerReady,
)
from nbbatch._plan import Sharding
from nbbatch._progress import ProgressSnapshot, RateMeter, WorkerProgress
from nbbatch._store.writer import Commit, ProgressRow, RunRecord

__all__ = ["Supervisor"]


@dataclass
class _Share:
    """One worker's events since its last checkpoint."""

    batches: list[BatchDone] = field(default_factory=list)
    metrics: list[tuple[int, int | None, int | None, MetricRecord]] = field(default_factory=list)
    awaits_segment: bool = False  # the worker writes this share's outputs as a segment
    segment: SegmentWritten | None = None  # its manifest, once written: committed with the share


@dataclass
class _Worker:
    rank: int
    todo: int
    done: int = 0
    rows: int = 0
    failed: int = 0
    status: str = "starting"
    current: tuple[int, int, float] | None = None
    pid: int | None = None
    last_event: float = 0.0


class Supervisor:
    """The launcher's view of one attempt."""

    def __init__(self, record: RunRecord, sharding: Sharding, clock: Callable[[], float] = time.time) -> None:
        self.record = record
        self.sharding = sharding
        self.clock = clock
        self.started = clock()
        self.committed: set[int] = set(record.done)
        self.workers = [_Worker(r, len(sharding.todo(r, record.done)), last_event=self.started) for r in range(sharding.world_size)]
        self.shares = [_Share() for _ in range(sharding.world_size)]
        self.ready: dict[int, dict[int, tuple[_Share, tuple[bytes, ...]]]] = {}
        self.early_segments: dict[tuple[int, int], SegmentWritten] = {}
        self.errors: list[BatchFailed] = []
        self.loose_metrics: list[tuple[int, int | None, int | None, MetricRecord]] = []
        self.fatal: BatchFailed | None = None
        self.reduced: dict[str, Any] | None = None
        self.finished: dict[int, str] = {}
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
        now = self.clock()
        rank = getattr(event, "rank", 0)
        worker = self.workers[rank] if rank < len(self.workers) else None
        if worker is not None:
            worker.last_event = now
        if isinstance(event, BatchStarted):
            assert worker is not None
            worker.current = (event.global_batch, event.batch_idx, event.t)
            worker.status = "running"
        elif isinstance(event, BatchDone):
            assert worker is not None
            worker.current = None
            worker.done += 1
            worker.rows += event.rows
            self.shares[rank].batches.append(event)
            for m in event.metrics:
                self.shares[rank].metrics.append((rank, event.global_batch, event.batch_idx, m))
                self.last_metrics.update(dict(m.metrics))
        elif isinstance(event, BatchFailed):
            if worker is not None:
                worker.current = None
                worker.failed += 1 if event.global_batch is not None else 0
            self.errors.append(event)
            where = f"batch_idx {event.batch_idx}" if event.batch_idx is not None else "outside a batch"
            self.recent_errors.append(f"rank {event.rank}, {where}: {event.exc_type}: {event.message}")
            if event.fatal and self.fatal is None:
                self.fatal = event
        elif isinstance(event, CheckpointDone):
            share, self.shares[rank] = self.shares[rank], _Share()
            share.metrics.extend((rank, None, None, m) for m in event.metrics)
            share.awaits_segment = event.segment
            share.segment = self.early_segments.pop((event.step, rank), None)
            self.ready.setdefault(event.step, {})[rank] = (share, event.reducer_states)
            self.too_many_failures |= event.failed
            self.stop_agreed |= event.stop
        elif isinstance(event, SegmentWritten):
            ready = self.ready.get(event.step, {}).get(rank)
            if ready is not None:
                ready[0].segment = event
            else:  # sent before its checkpoint (a torchrun peer finishes the write first)
                self.early_segments[(event.step, rank)] = event
        elif isinstance(event, Reduced):
            self.reduced = dict(event.metrics)
        elif isinstance(event, WorkerFinished):
            assert worker is not None
            worker.status = event.status
            self.finished[rank] = event.status
            self.used_upload_path |= event.used_upload_path
            self.loose_metrics.extend((rank, None, None, m) for m in event.metrics)
        elif isinstance(event, WorkerReady):
            assert worker is not None
            worker.pid = event.pid
            worker.status = "running"

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
                    commit.batches.append((b, self.sharding.indices(b.global_batch).start))
                commit.metrics.extend(share.metrics)
                commit.reducer_states[rank] = (step, states)
                if share.segment is not None:
                    commit.segments.append(share.segment)
        commit.metrics.extend(self.loose_metrics)
        self.loose_metrics = []
        commit.errors, self.errors = self.errors, []
        if self._dirty:
            self._dirty = False
            commit.progress = [
                ProgressRow(w.rank, w.done, w.rows, w.failed, w.todo, w.current[0] if w.current else None, w.status)
                for w in self.workers
            ]
            totals = (self.done_batches, sum(w.rows for w in self.workers), len(self.committed))
            if totals != self._last_log:
                self._last_log = totals
                commit.log = (self.clock(), *totals)
        return commit

    @property
    def done_batches(self) -> int:
        """Batches finished so far, committed before this attempt or processed in it."""
        return len(self.record.done) + sum(w.done for w in self.workers)

    def set_remote_progress(
        self, rank: int, done: int, rows: int, failed: int, current: tuple[int, int, float] | None, status: str
    ) -> None:
        """Overwrite a worker's live counters with its own totals (torchrun ranks report them between checkpoints)."""
        worker = self.workers[rank]
        worker.done, worker.rows, worker.failed, worker.current, worker.status = done, rows, failed, current, status
        worker.last_event = self.clock()
        self._dirty = True

    def hung(self, timeout: float) -> tuple[int, int, int, float] | None:
        """``(rank, global_batch, batch_idx, seconds)`` of a batch running longer than ``timeout``."""
        now = self.clock()
        for w in self.workers:
            if w.current is not None and now - w.current[2] > timeout:
                return w.rank, w.current[0], w.current[1], now - w.current[2]
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
            status=status,
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
