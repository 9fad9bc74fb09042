"""wrap_reducer's rules and Determined's error texts, in-process and at the end of a real run."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest

import nbbatch
from nbbatch import MetricReducer, TorchBatchProcessor, TorchBatchProcessorContext, WorkerFailed, torch_batch_process

pytestmark = pytest.mark.timeout(120)


class Listed(MetricReducer):
    """Collects values; returns whatever $NBBATCH_TEST_REDUCE asks for (a dict or a list)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.values: list[int] = []

    def update(self, value: int) -> None:
        self.values.append(value)

    def per_slot_reduce(self) -> list[int]:
        if os.environ.get("NBBATCH_TEST_REDUCE") == "raise":
            raise RuntimeError("per-slot broke")
        return self.values

    def cross_slot_reduce(self, per_slot_metrics: list[list[int]]) -> Any:
        flat = sorted(v for slot in per_slot_metrics for v in slot)
        return {"flat": flat} if os.environ.get("NBBATCH_TEST_REDUCE") == "dict" else flat


def as_list(values: list[int]) -> list[int]:
    return values


class Wrapping(TorchBatchProcessor):
    """Wraps per $NBBATCH_TEST_WRAP: `metric-named`, `metric-unnamed` or `function-unnamed`."""

    def __init__(self, context: Any) -> None:
        how = os.environ["NBBATCH_TEST_WRAP"]
        if how == "function-unnamed":
            self.reducer = context.wrap_reducer(as_list)
        else:
            self.reducer = context.wrap_reducer(Listed(), name="listed" if how == "metric-named" else None)

    def process_batch(self, batch: Any, batch_idx: int) -> None:
        for v in batch.tolist():
            self.reducer.update(v)


def go(tmp_path: pathlib.Path, workers: int = 2) -> nbbatch.Run:
    return torch_batch_process(Wrapping, list(range(6)), batch_size=2, num_processes=workers,
                               store=str(tmp_path / "s.duckdb"), run_name="red", progress=False)


@pytest.mark.parametrize(
    "wrap,reduce,text",
    [
        ("metric-named", "dict",
         'The custom reduction MetricReducer Listed was wrapped by a call to wrap_reducer() with name="listed" '
         "but it returned a dict anyway. Please leave name=None to return a dict of metrics, or return a single value."),
        ("metric-unnamed", "list",
         "The custom reduction MetricReducer Listed was wrapped by a call to wrap_reducer() with name=None but "
         "it did not return return a dict (it returned a list)."),
        ("function-unnamed", "list",
         "The custom reduction function as_list() was wrapped by a call to wrap_reducer() with name=None but it "
         "did not return a dict (it returned a list)."),
        ("metric-named", "raise", 'reducer of type Listed for name="listed" failed in a call to per_slot_reduce()'),
    ],
)
def test_reduction_errors_end_the_run_with_determined_texts(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, wrap: str, reduce: str, text: str
) -> None:
    monkeypatch.setenv("NBBATCH_TEST_WRAP", wrap)
    monkeypatch.setenv("NBBATCH_TEST_REDUCE", reduce)
    with pytest.raises(WorkerFailed) as info:
        go(tmp_path)
    assert text in info.value.remote_traceback
    assert nbbatch.open_run("red", store=str(tmp_path / "s.duckdb")).status == "failed"


@pytest.mark.parametrize(
    "wrap,reduce,expected",
    [
        ("metric-named", "list", {"listed": [0, 1, 2, 3, 4, 5]}),
        ("metric-unnamed", "dict", {"flat": [0, 1, 2, 3, 4, 5]}),
    ],
)
def test_valid_name_and_dict_combinations(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, wrap: str, reduce: str, expected: dict[str, Any]
) -> None:
    monkeypatch.setenv("NBBATCH_TEST_WRAP", wrap)
    monkeypatch.setenv("NBBATCH_TEST_REDUCE", reduce)
    assert go(tmp_path).reduced_metrics == expected


def test_wrap_reducer_refusals_have_determined_texts() -> None:
    ctx = TorchBatchProcessorContext()
    reducer = Listed()
    assert ctx.wrap_reducer(reducer, name="a") is reducer
    with pytest.raises(AssertionError) as info:
        ctx.wrap_reducer(reducer, name="b")
    assert str(info.value) == (
        "Detected the same reducer of type Listed in context.wrap_reducer(), please avoid calling "
        "wrap_reducer() on the same reducer object twice."
    )
    with pytest.raises(AssertionError) as info:
        ctx.wrap_reducer("not a reducer")  # type: ignore[arg-type]
    assert str(info.value) == (
        "Detected invalid reducer in wrap_reducer() of type str. Reducers must either be a function or a "
        "subclass of pytorch.MetricReducer."
    )
    # A function is wrapped into a MetricReducer with update(); a different function is accepted.
    assert isinstance(ctx.wrap_reducer(as_list, name="f"), MetricReducer)
