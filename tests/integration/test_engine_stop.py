"""A stop request belongs to the attempt that is live when it is made: `Run.stop()` on a run that
already ended (e.g. a dashboard click just after a failure) must not preempt its next resume."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest

import nbbatch
from nbbatch import TorchBatchProcessor, WorkerFailed, torch_batch_process

pytestmark = pytest.mark.timeout(120)

N, BS = 24, 2


class FailsUntilFixed(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        if os.environ.get("NBBATCH_TEST_FIXED") != "1" and 15 in batch.tolist():
            raise RuntimeError("not yet")
        self.total.update(int(batch.sum()))
        return {"value": batch}


def go(store: str) -> nbbatch.Run:
    return torch_batch_process(FailsUntilFixed, list(range(N)), batch_size=BS, num_processes=2, checkpoint_interval=1,
                               store=store, run_name="late", progress=False)


def test_stop_after_the_run_ended_does_not_preempt_the_resume(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = str(tmp_path / "s.duckdb")
    monkeypatch.delenv("NBBATCH_TEST_FIXED", raising=False)
    with pytest.raises(WorkerFailed):
        go(store)
    ended = nbbatch.open_run("late", store=store)
    assert ended.status == "failed"
    ended.stop()  # too late: nothing is live

    monkeypatch.setenv("NBBATCH_TEST_FIXED", "1")
    run = go(store)
    assert run.status == "done", "a stale stop request preempted the resumed attempt"
    assert [s for (s,) in run.outputs().project("sample_index").fetchall()] == list(range(N))
    assert run.reduced_metrics == {"total": sum(range(N))}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".stop")], "no stop file is left behind"
