"""Determined's upstream test table (reference §3), run against real worker processes and DuckDB.

Processors record what happened through nbbatch's own channels: returned outputs (one row per
sample with rank/batch_idx/global_batch/sample_index) and `report_metrics` from
`on_checkpoint_start` / `on_finish`.
"""

from __future__ import annotations

import pathlib
from collections import defaultdict
from typing import Any

import pytest
import torch
from helpers import Sum

import nbbatch
from nbbatch import InvalidArgument, InvalidDataset, TorchBatchProcessor, torch_batch_process

pytestmark = pytest.mark.timeout(120)


class Recorder(TorchBatchProcessor):
    """Returns its batch and reports every lifecycle call as a metric."""

    def __init__(self, context: Any) -> None:
        self.context = context

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        return {"value": batch}

    def on_checkpoint_start(self) -> None:
        self.context.report_metrics("lifecycle", 0, {"checkpoint": 1})

    def on_finish(self) -> None:
        self.context.report_metrics("lifecycle", 0, {"finish": 1})


def run(tmp_path: pathlib.Path, n: int, bs: int | None, workers: int, **kwargs: Any) -> nbbatch.Run:
    return torch_batch_process(
        kwargs.pop("cls", Recorder), list(range(n)), batch_size=bs, num_processes=workers,
        store=str(tmp_path / "store.duckdb"), progress=False, **kwargs,
    )


def batches_by_rank(r: nbbatch.Run) -> dict[int, list[list[int]]]:
    """rank -> list of sample-index lists, in batch_idx order."""
    rows = r.sql("SELECT rank, batch_idx, list(sample_index ORDER BY sample_index) FROM outputs GROUP BY ALL ORDER BY 1, 2").fetchall()
    out: dict[int, list[list[int]]] = defaultdict(list)
    for rank, batch_idx, samples in rows:
        assert batch_idx == len(out[rank]), "batch_idx must count this worker's batches from 0"
        out[rank].append(list(samples))
    return dict(out)


def lifecycle(r: nbbatch.Run, name: str) -> dict[int, int]:
    rows = r.metrics().filter(f"name = '{name}'").aggregate("rank, count(*)").fetchall()
    return {int(rank): int(count) for rank, count in rows}


@pytest.mark.parametrize(
    "n,bs,workers,calls",
    [(50, 10, 1, [5]), (50, 10, 2, [3, 2]), (50, 20, 1, [3]), (50, 20, 2, [2, 1])],
)
def test_process_batch_called_expected_number_of_times(tmp_path, n, bs, workers, calls) -> None:
    r = run(tmp_path, n, bs, workers, checkpoint_interval=1)
    by_rank = batches_by_rank(r)
    assert [len(by_rank.get(rank, [])) for rank in range(workers)] == calls
    assert lifecycle(r, "finish") == {rank: 1 for rank in range(workers)}
    assert r.status == "done"


@pytest.mark.parametrize("bs,expected", [(10, 3), (20, 2)])
def test_all_slots_checkpoint_same_number_of_times(tmp_path, bs, expected) -> None:
    r = run(tmp_path, 50, bs, 2, checkpoint_interval=1)
    assert lifecycle(r, "checkpoint") == {0: expected, 1: expected}


def test_batch_contents_are_round_robin_over_global_batches(tmp_path) -> None:
    r = run(tmp_path, 50, 10, 2)
    assert batches_by_rank(r) == {
        0: [list(range(0, 10)), list(range(20, 30)), list(range(40, 50))],
        1: [list(range(10, 20)), list(range(30, 40))],
    }
    rows = r.sql("SELECT DISTINCT rank, batch_idx, global_batch FROM outputs ORDER BY global_batch").fetchall()
    assert all(g == k * 2 + rank for rank, k, g in rows)


def test_short_final_batch_and_uneven_tail(tmp_path) -> None:
    r = run(tmp_path, 50, 20, 2)
    assert batches_by_rank(r) == {0: [list(range(0, 20)), list(range(40, 50))], 1: [list(range(20, 40))]}
    r = run(tmp_path, 7, 2, 3, run_name="seven")
    assert batches_by_rank(r) == {0: [[0, 1], [6]], 1: [[2, 3]], 2: [[4, 5]]}
    # Every worker joins both iterations' checkpoint even without data: no hang, on_finish everywhere.
    assert lifecycle(r, "finish") == {0: 1, 1: 1, 2: 1}


def test_drop_last_leaves_trailing_iterations_empty(tmp_path) -> None:
    r = run(tmp_path, 7, 2, 3, dataloader_kwargs={"drop_last": True})
    assert batches_by_rank(r) == {0: [[0, 1]], 1: [[2, 3]], 2: [[4, 5]]}
    assert r.counts["total_batches"] == 3


def test_follows_valid_max_batches(tmp_path) -> None:
    r = run(tmp_path, 50, 10, 2, max_batches=2)
    assert {k: len(v) for k, v in batches_by_rank(r).items()} == {0: 2, 1: 2}
    assert r.counts["total_batches"] == 4
    assert lifecycle(r, "finish") == {0: 1, 1: 1}


@pytest.mark.parametrize(
    "max_batches,text",
    [
        (10, "iterate_length 10 exceeds sharded dataset length. Ignoring this argument and iterate over entire dataset once"),
        (0, "iterate_length 0 is not valid. Ignoring this argument and iterate over entire dataset once"),
        (-3, "iterate_length -3 is not valid. Ignoring this argument and iterate over entire dataset once"),
    ],
)
def test_ignores_invalid_max_batches_and_warns_in_the_caller(tmp_path, max_batches, text) -> None:
    with pytest.warns(UserWarning) as record:
        r = run(tmp_path, 50, 10, 2, max_batches=max_batches)
    assert [str(w.message) for w in record] == [text]
    assert record[0].filename == __file__, "the warning must point at the caller's line"
    assert {k: len(v) for k, v in batches_by_rank(r).items()} == {0: 3, 1: 2}


def test_max_batches_equal_to_shard_does_not_warn(tmp_path) -> None:
    r = run(tmp_path, 50, 10, 2, max_batches=3)
    assert r.counts["committed_batches"] == 5


def test_empty_dataset_still_checkpoints_and_finishes(tmp_path) -> None:
    r = run(tmp_path, 0, 4, 2)
    assert r.status == "done"
    assert lifecycle(r, "checkpoint") == {0: 1, 1: 1}
    assert lifecycle(r, "finish") == {0: 1, 1: 1}
    assert r.outputs().fetchall() == []


def test_checkpoint_interval_counts_absolute_batches(tmp_path) -> None:
    r = run(tmp_path, 100, 10, 1, checkpoint_interval=2)
    assert lifecycle(r, "checkpoint") == {0: 5}
    r = run(tmp_path, 100, 10, 1, checkpoint_interval=3, run_name="three")
    # iterations 3, 6, 9 checkpoint in the loop; the 10th gets the final one.
    assert lifecycle(r, "checkpoint") == {0: 4}


class ReducingProcessor(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        self.sum = context.wrap_reducer(Sum(), name="sum_metric")
        self.order = context.wrap_reducer(lambda values: {"values": values, "sum": sum(values)})

    def process_batch(self, batch: Any, batch_idx: int) -> None:
        self.sum.update(int(batch.sum()))
        for value in batch.tolist():
            self.order.update(value)


def test_reduce_metrics_sum(tmp_path) -> None:
    r = run(tmp_path, 10, 5, 2, cls=ReducingProcessor, checkpoint_interval=1)
    assert r.reduced_metrics["sum_metric"] == 45


@pytest.mark.parametrize("workers", [1, 3])
def test_function_reducer_sees_global_order(tmp_path, workers) -> None:
    r = run(tmp_path, 47, 2, workers, cls=ReducingProcessor)
    assert r.reduced_metrics["values"] == list(range(47))
    assert r.reduced_metrics["sum"] == 47 * 46 // 2 == 1081


# -- validation: Determined's texts, raised in the caller before any worker starts ----------------------------


@pytest.mark.parametrize(
    "kwargs,text",
    [
        ({"shuffle": True}, "'shuffle' must be false for accurate sharding and checkpointing"),
        ({"sampler": object()}, "Please remove 'sampler' arg as we will initialize a sampler automatically."),
        ({"batch_sampler": object()}, "Please remove 'batch_sampler' arg as we will initialize a batch_sampler automatically."),
        ({"batch_size": 20}, "batch_size is passed into torch_batch_process and dataloader_kwargs"),
    ],
)
def test_invalid_dataloader_kwargs(tmp_path, kwargs, text) -> None:
    with pytest.raises(ValueError) as info:
        run(tmp_path, 10, 10, 1, dataloader_kwargs=kwargs)
    assert str(info.value) == text
    assert isinstance(info.value, InvalidArgument)
    assert not (tmp_path / "store.duckdb").exists(), "validation happens before the store is touched"


@pytest.mark.parametrize("interval", [-1, 0])
def test_invalid_checkpoint_interval(tmp_path, interval) -> None:
    with pytest.raises(ValueError, match="^checkpoint_interval should be a positive integer$"):
        run(tmp_path, 10, 2, 1, checkpoint_interval=interval)


def test_dataset_without_len(tmp_path) -> None:
    class NoLen(torch.utils.data.Dataset):
        def __getitem__(self, i: int) -> int:
            return i

    with pytest.raises(InvalidDataset, match=r"^Dataset must implement __len__\(\)$"):
        torch_batch_process(Recorder, NoLen(), store=str(tmp_path / "s.duckdb"), progress=False)


def test_batch_size_from_dataloader_kwargs_without_mutation(tmp_path) -> None:
    kwargs = {"batch_size": 4, "shuffle": False}
    r = run(tmp_path, 10, None, 1, dataloader_kwargs=kwargs)
    assert kwargs == {"batch_size": 4, "shuffle": False}
    assert [len(b) for b in batches_by_rank(r)[0]] == [4, 4, 2]
    r = run(tmp_path, 3, None, 1, run_name="default-size")
    assert [len(b) for b in batches_by_rank(r)[0]] == [1, 1, 1]


def test_abstract_processor_is_refused_in_the_caller(tmp_path) -> None:
    class Incomplete(TorchBatchProcessor):
        def process_batch(self, batch: Any, batch_idx: int) -> None:
            return None

    with pytest.raises(TypeError, match="abstract"):
        torch_batch_process(Incomplete, [1, 2], store=str(tmp_path / "s.duckdb"), progress=False)
