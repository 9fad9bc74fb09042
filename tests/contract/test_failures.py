"""on_error="raise" / "skip", max_failures, and resuming a failed run after fixing the cause."""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import pytest

import nbbatch
from nbbatch import RunFailed, TorchBatchProcessor, WorkerFailed, torch_batch_process

pytestmark = pytest.mark.timeout(120)


class FailsOnMultiplesOfSeven(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        if os.environ.get("NBBATCH_TEST_FIXED") != "1" and any(int(v) % 7 == 6 for v in batch):
            raise ValueError(f"bad sample in {batch.tolist()}")
        self.total.update(int(batch.sum()))
        return {"value": batch}


def go(tmp_path: pathlib.Path, **kwargs: Any) -> nbbatch.Run:
    return torch_batch_process(FailsOnMultiplesOfSeven, list(range(40)), batch_size=4, num_processes=2,
                               store=str(tmp_path / "s.duckdb"), progress=False, **kwargs)


def test_raise_stops_everything_with_the_remote_traceback_then_resume(tmp_path: pathlib.Path, monkeypatch) -> None:
    started = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        go(tmp_path, run_name="r")
    err = info.value
    # Whichever failing batch is reported first stops the run; its coordinates must agree.
    g = err.global_batch
    assert g is not None and err.rank == g % 2 and err.batch_idx == g // 2 and err.indices == list(range(4 * g, 4 * g + 4))
    assert any(i % 7 == 6 for i in err.indices)
    assert f"ValueError: bad sample in {err.indices}" in err.remote_traceback and "process_batch" in err.remote_traceback
    assert "run_name='r'" in str(err)
    assert time.monotonic() - started < 60
    run = nbbatch.open_run("r", store=str(tmp_path / "s.duckdb"))
    assert run.status == "failed" and "ValueError" in (run.error or "")
    monkeypatch.setenv("NBBATCH_TEST_FIXED", "1")
    run = go(tmp_path, run_name="r")
    assert run.status == "done"
    assert [r[0] for r in run.outputs().project("sample_index").fetchall()] == list(range(40))
    assert run.reduced_metrics == {"total": sum(range(40))}


def test_skip_records_failures_and_finishes(tmp_path: pathlib.Path) -> None:
    run = go(tmp_path, on_error="skip")
    assert run.status == "done"
    errors = run.errors().df()
    failing = {g for g in range(10) if any(i % 7 == 6 for i in range(4 * g, 4 * g + 4))}
    assert set(errors.global_batch) == failing and not errors.fatal.any()
    assert all("ValueError" in tb for tb in errors.traceback)
    assert sorted(list(v) for v in errors.indices) == sorted([list(range(4 * g, 4 * g + 4)) for g in failing])
    stored = {r[0] // 4 for r in run.outputs().project("sample_index").fetchall()}
    assert stored == set(range(10)) - failing


def test_more_failures_than_allowed_fail_the_run(tmp_path: pathlib.Path) -> None:
    with pytest.raises(RunFailed, match="max_failures"):
        go(tmp_path, on_error="skip", max_failures=2, checkpoint_interval=1, run_name="strict")
    assert nbbatch.open_run("strict", store=str(tmp_path / "s.duckdb")).status == "failed"


def test_bad_on_error_is_refused() -> None:
    with pytest.raises(nbbatch.InvalidArgument, match="on_error"):
        torch_batch_process(FailsOnMultiplesOfSeven, [1], on_error="ignore", progress=False)  # type: ignore[arg-type]
