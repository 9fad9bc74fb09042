"""What the store's writer takes and gives: a run's spec, its record, and one flush's rows.

`RunSpec` is what a launch asks for, `RunRecord` the store's answer (which run, what of it is
committed), and `Commit` everything one transaction writes, each row a named record rather than
a tuple read by position. ``writer.py`` re-exports them; the launcher builds commits from worker
events (``_launch/supervisor.py``). Must not import anything from nbbatch but ``_events``,
``_plan`` and ``_store``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

from nbbatch._events import BatchDone, BatchFailed, MetricRecord, SegmentWritten, Status
from nbbatch._plan import Fingerprint
from nbbatch._store.inputs import InputsInfo

__all__ = [
    "Commit",
    "CommittedBatch",
    "LogRow",
    "MetricRow",
    "ProgressRow",
    "ReducerStates",
    "RunRecord",
    "RunSpec",
]


@dataclass(frozen=True)
class RunSpec:
    """What a launch asks of the store: a name (or None for a new run) and the run's fingerprint."""

    name: str | None
    processor: str
    dataset_len: int
    batch_size: int
    max_batches: int | None
    checkpoint_interval: int
    world_size: int
    planned_batches: int
    real_batches: int
    on_error: str
    max_failures: int | None
    output_root: str
    launch: dict[str, Any] | None
    config: dict[str, Any]  # the call's options (`RunConfig.describe()`); keys that are `runs` columns are stored there
    trust: bool = False  # re-sign the run's records with this user's key instead of refusing foreign ones
    inputs: InputsInfo | None = None  # a TableDataset's snapshot: rows and content hash (``_store/inputs.py``)

    @property
    def fingerprint(self) -> Fingerprint:
        """What must match the stored run for this spec to resume it."""
        return Fingerprint(self.dataset_len, self.batch_size, self.processor, self.max_batches)


@dataclass(frozen=True)
class RunRecord:
    """The store's answer: which run this is and what of it is already committed."""

    run_id: str
    name: str
    status: Status
    attempt: int
    planned_batches: int
    output_dir: str
    done: frozenset[int]
    reducer_states: tuple[tuple[int, int, tuple[bytes, ...]], ...]  # (attempt, rank, states) of the last commit
    output_columns: tuple[str, ...] = ()  # of the outputs table so far: workers refuse keys differing in case


@dataclass(frozen=True)
class ProgressRow:
    """Live counters of one worker in the current attempt (``status`` also ``starting``, not only a `Status`)."""

    rank: int
    batches: int
    rows: int
    failed: int
    todo: int
    current_batch: int | None
    status: str


class CommittedBatch(NamedTuple):
    """A batch whose checkpoint step commits, and the dataset index of its first sample."""

    batch: BatchDone
    first_index: int


class MetricRow(NamedTuple):
    """One ``report_metrics`` call; ``global_batch`` and ``batch_idx`` are None outside a batch."""

    rank: int
    global_batch: int | None
    batch_idx: int | None
    record: MetricRecord


class ReducerStates(NamedTuple):
    """One rank's ``per_slot_reduce()`` values at the checkpoint step they belong to."""

    step: int
    states: tuple[bytes, ...]


class LogRow(NamedTuple):
    """One point of the overall progress series (``progress_log``)."""

    t: float  # time.time()
    done: int  # batches done so far, committed or not
    rows: int
    committed: int


@dataclass
class Commit:
    """Everything written in one transaction."""

    batches: list[CommittedBatch] = field(default_factory=list)
    reducer_states: dict[int, ReducerStates] = field(default_factory=dict)  # by rank
    metrics: list[MetricRow] = field(default_factory=list)
    errors: list[BatchFailed] = field(default_factory=list)
    progress: list[ProgressRow] = field(default_factory=list)
    log: LogRow | None = None
    segments: list[SegmentWritten] = field(default_factory=list)  # manifests of the batches' output segments

    def __bool__(self) -> bool:
        return bool(self.batches or self.reducer_states or self.metrics or self.errors or self.progress or self.log
                    or self.segments)
