"""The batch loop in this process: the events it emits, its error policy, and one pickle per batch.

`run_loop` runs with the real one-worker `SoloCoordinator`, into a sink that keeps events in a list
(as rank 0's sink under torchrun hands them on in-process) or into a local worker's `PipeSink` over
a real pipe, whose far end a thread reads.
"""

from __future__ import annotations

import json
import pathlib
import threading
from collections.abc import Callable, Iterator
from multiprocessing import Pipe
from typing import Any

import cloudpickle
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from nbbatch import TorchBatchProcessor
from nbbatch._events import (
    BatchDone,
    BatchFailed,
    CheckpointDone,
    Event,
    MetricRecord,
    Reduced,
    SegmentWritten,
    Status,
    WorkerFinished,
)
from nbbatch._plan import make_sharding
from nbbatch._processor import Ledger, worker_context
from nbbatch._rows import SEGMENT_FOLDER, marker_name
from nbbatch._worker.collective import Coordinator, SoloCoordinator
from nbbatch._worker.entry import PipeSink
from nbbatch._worker.loop import WorkerSpec, run_loop

pytestmark = pytest.mark.timeout(30)

N, BATCH = 12, 4  # three batches


class ListSink:
    """Keeps every event, as rank 0's sink under torchrun hands them to its supervisor in-process."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def flush(self, coordinator: Coordinator) -> None:
        return None


class PipeEnds:
    """A local worker's `PipeSink` and the launcher's end of the pipe, read by a thread until end-of-file."""

    def __init__(self) -> None:
        self.recv, send = Pipe(duplex=False)
        self.sink = PipeSink(send)
        self.events: list[Event] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        try:
            while True:
                self.events.append(self.recv.recv())
        except EOFError:
            pass

    def close(self) -> list[Event]:
        self.sink.conn.close()
        self.reader.join(10)
        return self.events


PICKLED = [0]


class Counted:
    """Counts how often it is pickled."""

    def __reduce__(self) -> tuple[Any, ...]:
        PICKLED[0] += 1
        return (Counted, ())


class Returning(TorchBatchProcessor):
    """Returns ``OUTPUT(batch, batch_idx)``, reports a metric and sums the samples in a function reducer."""

    output: Callable[[torch.Tensor, int], Any] = staticmethod(lambda batch, batch_idx: {"y": batch * 2})

    def __init__(self, context: Any) -> None:
        self.context = context
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")

    def process_batch(self, batch: torch.Tensor, batch_idx: int) -> Any:
        self.total.update(batch.sum())
        self.context.report_metrics("m", batch_idx, {"n": torch.tensor(len(batch))})
        return type(self).output(batch, batch_idx)


def processor(output: Callable[[torch.Tensor, int], Any]) -> type[Returning]:
    return type("Custom", (Returning,), {"output": staticmethod(output)})


def spec(tmp_path: pathlib.Path, cls: type, **options: Any) -> WorkerSpec:
    defaults: dict[str, Any] = dict(checkpoint_interval=2, on_error="skip", max_failures=None)
    return WorkerSpec(
        user=cloudpickle.dumps((cls, torch.arange(float(N)), {})), sharding=make_sharding(N, BATCH, 1),
        done=frozenset(), output_dir=str(tmp_path), run_id="run1", **{**defaults, **options},
    )


def run(tmp_path: pathlib.Path, cls: type, stop: bool = False, **options: Any) -> tuple[Status, list[Event]]:
    sink = ListSink()
    status = run_loop(spec(tmp_path, cls, **options), 0, 0, SoloCoordinator(), sink, lambda: stop)
    return status, sink.events


def kinds(events: list[Event]) -> list[str]:
    return [type(e).__name__ for e in events]


@pytest.fixture
def pickles() -> Iterator[list[int]]:
    PICKLED[0] = 0
    yield PICKLED


# -- the order of events -----------------------------------------------------------------------------


def test_events_follow_determineds_order(tmp_path: pathlib.Path) -> None:
    status, events = run(tmp_path, Returning)
    assert status is Status.DONE
    assert kinds(events) == [
        "WorkerReady",
        "BatchStarted", "BatchDone", "BatchStarted", "BatchDone", "CheckpointDone",
        "BatchStarted", "BatchDone", "CheckpointDone",
        "Reduced", "WorkerFinished",
    ]
    done = [e for e in events if isinstance(e, BatchDone)]
    assert [d.global_batch for d in done] == [0, 1, 2] and done[0].outputs is not None
    assert list(done[2].outputs["y"]) == [16.0, 18.0, 20.0, 22.0]
    assert done[0].metrics[0].metrics == (("n", 4),), "a tensor metric travels as a number"
    assert [e.step for e in events if isinstance(e, CheckpointDone)] == [2, 3]
    reduced = next(e for e in events if isinstance(e, Reduced))
    assert reduced.metrics == {"total": float(sum(range(N)))} and type(reduced.metrics["total"]) is float
    assert events[-1] == WorkerFinished(0, Status.DONE, (), False)


def test_a_stop_request_preempts_at_the_first_checkpoint(tmp_path: pathlib.Path) -> None:
    status, events = run(tmp_path, Returning, stop=True)
    assert status is Status.PREEMPTED
    checkpoint = next(e for e in events if isinstance(e, CheckpointDone))
    assert checkpoint.step == 2 and checkpoint.stop
    assert kinds(events)[-2:] == ["Reduced", "WorkerFinished"] and events[-1].status == Status.PREEMPTED  # type: ignore[union-attr]


def test_on_error_raise_ends_at_the_failing_batch(tmp_path: pathlib.Path) -> None:
    def fail_second(batch: torch.Tensor, batch_idx: int) -> Any:
        if batch_idx == 1:
            raise ValueError("bad batch")
        return None

    status, events = run(tmp_path, processor(fail_second), on_error="raise")
    assert status is Status.FAILED
    last = events[-1]
    assert isinstance(last, BatchFailed) and last.fatal and last.batch_idx == 1 and last.indices == (4, 5, 6, 7)
    assert last.exc_type == "ValueError" and "bad batch" in last.traceback
    assert not any(isinstance(e, WorkerFinished) for e in events)


def test_too_many_skipped_batches_fail_the_worker_at_the_checkpoint(tmp_path: pathlib.Path) -> None:
    def fail(batch: torch.Tensor, batch_idx: int) -> Any:
        raise ValueError("always")

    status, events = run(tmp_path, processor(fail), max_failures=1)
    assert status is Status.FAILED
    assert [e.batch_idx for e in events if isinstance(e, BatchFailed)] == [0, 1]
    assert next(e for e in events if isinstance(e, CheckpointDone)).failed
    assert events[-1] == WorkerFinished(0, Status.FAILED, (), False)


class BrokenInit(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        raise RuntimeError("no model")

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        return None


def test_an_error_outside_a_batch_is_reported_once(tmp_path: pathlib.Path) -> None:
    status, events = run(tmp_path, BrokenInit)
    assert status is Status.FAILED
    assert len(events) == 1 and isinstance(events[0], BatchFailed)
    assert events[0].global_batch is None and events[0].fatal and events[0].message == "no model"


# -- one pickle per batch, and the batch's error when it fails ----------------------------------------


def test_a_pipe_pickles_each_batchs_outputs_once(tmp_path: pathlib.Path, pickles: list[int]) -> None:
    ends = PipeEnds()
    status = run_loop(spec(tmp_path, processor(lambda b, k: {"obj": [Counted() for _ in b]})), 0, 0,
                      SoloCoordinator(), ends.sink, lambda: False)
    events = ends.close()
    assert status is Status.DONE and sum(isinstance(e, BatchDone) for e in events) == 3
    assert pickles[0] == N, "each sample's value is pickled once, by the pipe"


def test_a_sink_that_does_not_pickle_gets_outputs_checked_once(tmp_path: pathlib.Path, pickles: list[int]) -> None:
    status, _ = run(tmp_path, processor(lambda b, k: {"obj": [Counted() for _ in b]}))
    assert status is Status.DONE and pickles[0] == N


def with_lock(batch: torch.Tensor, batch_idx: int) -> Any:
    return {"x": batch, "handle": [threading.Lock() if batch_idx == 1 else "ok" for _ in batch]}


@pytest.mark.parametrize("through", ["pipe", "list"])
def test_an_unpicklable_output_is_the_batchs_error(tmp_path: pathlib.Path, through: str) -> None:
    cls = processor(with_lock)
    if through == "pipe":
        ends = PipeEnds()
        status = run_loop(spec(tmp_path, cls), 0, 0, SoloCoordinator(), ends.sink, lambda: False)
        events = ends.close()
    else:
        status, events = run(tmp_path, cls)
    assert status is Status.DONE
    failed = [e for e in events if isinstance(e, BatchFailed)]
    assert [(e.batch_idx, e.fatal) for e in failed] == [(1, False)]
    assert "output 'handle' holds a value that cannot be pickled" in failed[0].message
    assert "`str(x)`" in failed[0].message
    assert [e.batch_idx for e in events if isinstance(e, BatchDone)] == [0, 2]


def test_unpicklable_metrics_through_the_pipe_are_the_batchs_error(tmp_path: pathlib.Path) -> None:
    class Locked(Returning):
        def process_batch(self, batch: torch.Tensor, batch_idx: int) -> Any:
            if batch_idx == 0:
                self.context.report_metrics("m", batch_idx, {"lock": threading.Lock()})
            return {"y": batch}

    ends = PipeEnds()
    status = run_loop(spec(tmp_path, Locked), 0, 0, SoloCoordinator(), ends.sink, lambda: False)
    events = ends.close()
    assert status is Status.DONE
    failed = [e for e in events if isinstance(e, BatchFailed)]
    assert [e.batch_idx for e in failed] == [0] and "the metrics reported in this batch cannot be pickled" in failed[0].message


def test_keys_of_a_batch_that_was_not_sent_are_not_remembered(tmp_path: pathlib.Path) -> None:
    def clash(batch: torch.Tensor, batch_idx: int) -> Any:
        return {"x": [threading.Lock() for _ in batch]} if batch_idx == 0 else {"X": batch}

    ends = PipeEnds()
    status = run_loop(spec(tmp_path, processor(clash)), 0, 0, SoloCoordinator(), ends.sink, lambda: False)
    events = ends.close()
    assert status is Status.DONE
    assert [e.batch_idx for e in events if isinstance(e, BatchFailed)] == [0]
    assert [e.batch_idx for e in events if isinstance(e, BatchDone)] == [1, 2], "`X` does not clash with a failed `x`"


def test_a_segment_holds_no_rows_of_a_failed_batch(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / SEGMENT_FOLDER
    folder.mkdir()
    (folder / marker_name(1)).write_text(json.dumps({"inline_bytes": 0}))  # every batch into the segment
    status, events = run(tmp_path, processor(with_lock))
    assert status is Status.DONE
    assert [e.batch_idx for e in events if isinstance(e, BatchFailed)] == [1]
    assert all(e.outputs is None for e in events if isinstance(e, BatchDone)), "outputs travel in segments"
    written = [e for e in events if isinstance(e, SegmentWritten)]
    assert [w.global_batches for w in written] == [(0,), (2,)]
    rows = [pq.read_table(folder / w.file).column("global_batch").to_pylist() for w in written]
    assert rows == [[0] * BATCH, [2] * BATCH]


def reusing_a_buffer() -> type[Returning]:
    """A processor that returns views of one buffer (a tensor and an array) it fills again for every batch."""
    tensor, array = torch.zeros(BATCH), np.zeros((BATCH, 2))

    def output(batch: torch.Tensor, batch_idx: int) -> Any:
        tensor[: len(batch)] = batch
        array[: len(batch)] = batch.numpy()[:, None]
        return {"t": tensor[: len(batch)], "a": array[: len(batch)], "l": [tensor[k] for k in range(len(batch))]}

    return processor(output)


@pytest.mark.parametrize("where", ["segment", "held in the sink"])
def test_outputs_kept_after_the_batch_do_not_change_when_the_processor_reuses_its_buffer(
        tmp_path: pathlib.Path, where: str) -> None:
    """Each batch's rows are its own, in a segment and in a sink that ships at checkpoints (torchrun)."""
    if where == "segment":
        folder = tmp_path / SEGMENT_FOLDER
        folder.mkdir()
        (folder / marker_name(1)).write_text(json.dumps({"inline_bytes": 0}))
    status, events = run(tmp_path, reusing_a_buffer())
    assert status is Status.DONE
    if where == "segment":
        written = [e for e in events if isinstance(e, SegmentWritten)]
        table = pa.concat_tables(pq.read_table(tmp_path / SEGMENT_FOLDER / w.file) for w in written)
        rows = table.select(["sample_index", "t", "a", "l"]).to_pylist()
        got = {r["sample_index"]: (r["t"], r["a"], r["l"]) for r in rows}
    else:
        got = {}
        for e in events:
            if isinstance(e, BatchDone):
                for k in range(e.rows):
                    got[BATCH * e.global_batch + k] = (float(e.outputs["t"][k]), list(e.outputs["a"][k]),
                                                       float(e.outputs["l"][k]))
    assert got == {i: (float(i), [float(i)] * 2, float(i)) for i in range(N)}


# -- the ledger ---------------------------------------------------------------------------------------


def test_the_context_reports_into_the_loops_ledger(tmp_path: pathlib.Path) -> None:
    ledger = Ledger()
    context = worker_context(ledger, 1, 2, 0, tmp_path)
    assert context.get_distributed_rank() == 1 and context.get_distributed_size() == 2
    reducer = context.wrap_reducer(lambda values: values, name="order")
    ledger.global_batch = 7
    reducer.update(torch.tensor(1.5))  # type: ignore[attr-defined]
    context.report_metrics("g", 3, {"loss": torch.tensor(0.5)})
    with context.upload_path() as path:
        assert path == tmp_path / "rank_1"
    assert ledger.used_upload_path
    taken = ledger.take_metrics()
    assert isinstance(taken[0], MetricRecord) and taken[0].metrics == (("loss", 0.5),) and ledger.take_metrics() == ()
    assert ledger.reduce([ledger.per_slot_states()]) == {"order": [1.5]}


def test_reported_metrics_are_values_taken_when_reported(tmp_path: pathlib.Path) -> None:
    """A metric waits for its batch's commit; an array or tensor written into later must not change it."""
    ledger = Ledger()
    context = worker_context(ledger, 0, 1, 0, tmp_path)
    tensor, array = torch.tensor([1.0, 2.0]), np.array([3.0, 4.0])
    context.report_metrics("g", 1, {"t": tensor, "a": array, "one": np.array([5]), "s": np.float32(0.5)})
    tensor[:] = 0
    array[:] = 0
    (record,) = ledger.take_metrics()
    assert dict(record.metrics) == {"t": [1.0, 2.0], "a": [3.0, 4.0], "one": 5, "s": 0.5}
