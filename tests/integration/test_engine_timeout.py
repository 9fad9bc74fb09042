"""`batch_timeout`: a hung `process_batch` fails the whole run with a clear message, leaves no worker
behind, and the run resumes exactly once after the cause is fixed. Real workers, a real store."""

from __future__ import annotations

import os
import pathlib
import time
from typing import Any

import pytest
from helpers import poll, worker_processes

import nbbatch
from nbbatch import TorchBatchProcessor, WorkerFailed, torch_batch_process

pytestmark = pytest.mark.timeout(150)

N, BS, HANG_AT = 24, 2, 9  # sample 9 lives in global batch 4: rank 0, batch_idx 2 with 2 workers


class HangsOnce(TorchBatchProcessor):
    """Sleeps far past any timeout on the batch holding sample HANG_AT unless $NBBATCH_TEST_FIXED=1."""

    def __init__(self, context: Any) -> None:
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        if os.environ.get("NBBATCH_TEST_FIXED") != "1" and HANG_AT in batch.tolist():
            time.sleep(600)
        self.total.update(int(batch.sum()))
        return {"value": batch + 100}


def test_hung_batch_fails_the_run_then_resume_completes(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = str(tmp_path / "s.duckdb")
    monkeypatch.delenv("NBBATCH_TEST_FIXED", raising=False)
    started = time.monotonic()
    with pytest.raises(WorkerFailed) as info:
        torch_batch_process(HangsOnce, list(range(N)), batch_size=BS, num_processes=2, checkpoint_interval=1,
                            store=store, run_name="hang", progress=False, batch_timeout=2)
    assert time.monotonic() - started < 120, "the hang must not wait for the 600 s sleep"
    err = info.value
    assert (err.rank, err.batch_idx, err.global_batch) == (0, 2, 4)
    assert err.indices == [8, 9]
    text = str(err)
    assert "batch_timeout=2" in text and "process_batch" in text and "batch_idx 2" in text
    assert "run_name='hang'" in text, "the message says how to resume"

    # No worker survives the failure (the forkserver and resource tracker may stay).
    poll(lambda: worker_processes() == [], 15, "every worker to be stopped", every=0.1)

    run = nbbatch.open_run("hang", store=store)
    assert run.status == "failed" and "batch_timeout" in (run.error or "")
    before = [s for (s,) in run.outputs().project("sample_index").fetchall()]
    assert HANG_AT not in before and len(before) == len(set(before))

    monkeypatch.setenv("NBBATCH_TEST_FIXED", "1")
    resumed = torch_batch_process(HangsOnce, list(range(N)), batch_size=BS, num_processes=2, checkpoint_interval=1,
                                  store=store, run_name="hang", progress=False, batch_timeout=2)
    assert resumed.id == run.id and resumed.status == "done"
    assert [s for (s,) in resumed.outputs().project("sample_index").fetchall()] == list(range(N))
    assert [v for (v,) in resumed.outputs().project("value").fetchall()] == [i + 100 for i in range(N)]
    assert resumed.reduced_metrics == {"total": sum(range(N))}


def test_batch_timeout_must_be_positive(tmp_path: pathlib.Path) -> None:
    with pytest.raises(nbbatch.InvalidArgument, match="batch_timeout"):
        torch_batch_process(HangsOnce, [1], store=str(tmp_path / "s.duckdb"), progress=False, batch_timeout=0)
