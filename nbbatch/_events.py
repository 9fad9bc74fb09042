"""Frozen messages, the only things that cross process boundaries (worker -> launcher -> store).

Payloads are plain Python and numpy (never torch tensors: a tensor over a pipe goes through shared
memory and is ~27x slower). Must not import torch, duckdb or other nbbatch modules.
"""

from __future__ import annotations

import enum
import sys
from dataclasses import dataclass, field
from typing import Any, Union

__all__ = [
    "BatchDone",
    "BatchFailed",
    "BatchStarted",
    "CheckpointDone",
    "Control",
    "Event",
    "MetricRecord",
    "Reduced",
    "SegmentWritten",
    "Status",
    "WorkerFinished",
    "WorkerReady",
]

if sys.version_info >= (3, 11):
    _StrEnum = enum.StrEnum
else:  # pragma: no cover - Python 3.10

    class _StrEnum(str, enum.Enum):
        """`enum.StrEnum` of Python 3.11: members print and format as their value."""

        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return str(self.value).__format__(spec)

        def __hash__(self) -> int:  # as a str, so `"done" in {Status.DONE}` holds
            return str.__hash__(self)


class Status(_StrEnum):
    """A run's status (`Run.status`), stored as its plain string value.

    Members are strings, so ``run.status == "done"`` holds and the value prints as ``done``.
    ``interrupted`` is never written by a live run: readers report it for a run whose row says
    ``running`` while no process holds the store's writer lock (its launcher was SIGKILLed, OOM
    killed, or its kernel died), and the next writer of the store records it.

    Example:
        >>> Status("done") is Status.DONE and Status.DONE == "done"
        True
    """

    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    PREEMPTED = "preempted"
    INTERRUPTED = "interrupted"

    @property
    def resumable(self) -> bool:
        """Whether naming the run resumes it (failed, preempted or interrupted)."""
        return self in (Status.FAILED, Status.PREEMPTED, Status.INTERRUPTED)


class Control(_StrEnum):
    """A message on a local worker's control pipe (launcher -> worker)."""

    STOP = "stop"  # finish the current step, commit it, and leave as preempted


@dataclass(frozen=True)
class MetricRecord:
    """One ``report_metrics`` call, flattened to name/value pairs."""

    group: str
    steps_completed: int
    metrics: tuple[tuple[str, Any], ...]
    reported_at: float


@dataclass(frozen=True)
class WorkerReady:
    """A worker has built its processor and is about to iterate."""

    rank: int
    pid: int
    host: str
    t: float


@dataclass(frozen=True)
class BatchStarted:
    """A worker entered ``process_batch``; lets the launcher spot hangs."""

    rank: int
    global_batch: int
    batch_idx: int
    t: float


@dataclass(frozen=True)
class BatchDone:
    """A batch finished; committed only at the next checkpoint.

    ``outputs`` maps column name to a per-sample sequence (numpy array or list) of length ``rows``.
    """

    rank: int
    global_batch: int
    batch_idx: int
    rows: int
    started_at: float
    seconds: float
    outputs: dict[str, Any] | None = None
    metrics: tuple[MetricRecord, ...] = ()


@dataclass(frozen=True)
class BatchFailed:
    """``process_batch`` (or loading the batch) raised.

    ``fatal`` is True under ``on_error="raise"`` and for errors outside a batch (then
    ``global_batch`` is None).
    """

    rank: int
    global_batch: int | None
    batch_idx: int | None
    indices: tuple[int, ...]
    exc_type: str
    message: str
    traceback: str
    fatal: bool
    t: float


@dataclass(frozen=True)
class CheckpointDone:
    """All workers passed checkpoint ``step``; everything this rank sent before is committable.

    ``reducer_states`` holds one ``per_slot_reduce()`` value per wrapped reducer, as
    ``_worker.state.dump_state`` bytes (JSON when plain data, else a pickle).
    ``stop`` tells whether the workers agreed to stop here (preemption).
    """

    rank: int
    step: int
    reducer_states: tuple[bytes, ...] = ()
    metrics: tuple[MetricRecord, ...] = ()
    stop: bool = False
    failed: bool = False
    segment: bool = False  # this rank's outputs of the step are in a segment: a `SegmentWritten` follows


@dataclass(frozen=True)
class SegmentWritten:
    """A worker wrote its outputs of checkpoint ``step`` as one Parquet segment (``_rows.segment_name``).

    The step is committed, with this manifest, only once this arrived; ``schema`` is the Arrow
    schema (IPC bytes) from which the store takes the columns' DuckDB types.
    """

    rank: int
    step: int
    file: str
    rows: int
    nbytes: int
    checksum: str
    global_batches: tuple[int, ...]
    schema: bytes


@dataclass(frozen=True)
class Reduced:
    """Rank 0's cross-worker reduction of the wrapped reducers."""

    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class WorkerFinished:
    """A worker left its loop: ``status`` is ``done``, ``preempted`` or ``failed``."""

    rank: int
    status: str
    metrics: tuple[MetricRecord, ...] = ()
    used_upload_path: bool = False


Event = Union[
    WorkerReady, BatchStarted, BatchDone, BatchFailed, CheckpointDone, SegmentWritten, Reduced, WorkerFinished
]
