"""Frozen messages, the only things that cross process boundaries (worker -> launcher -> store).

Payloads are plain Python and numpy (never torch tensors: a tensor over a pipe goes through shared
memory and is ~27x slower). Must not import torch, duckdb or other nbbatch modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NewType, Union

__all__ = [
    "BatchDone",
    "BatchFailed",
    "BatchStarted",
    "CheckpointDone",
    "Event",
    "MetricRecord",
    "Reduced",
    "RunId",
    "WorkerFinished",
    "WorkerReady",
]

RunId = NewType("RunId", str)


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

    ``reducer_states`` holds one pickled ``per_slot_reduce()`` value per wrapped reducer.
    ``stop`` tells whether the workers agreed to stop here (preemption).
    """

    rank: int
    step: int
    reducer_states: tuple[bytes, ...] = ()
    metrics: tuple[MetricRecord, ...] = ()
    stop: bool = False
    failed: bool = False


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


Event = Union[WorkerReady, BatchStarted, BatchDone, BatchFailed, CheckpointDone, Reduced, WorkerFinished]
