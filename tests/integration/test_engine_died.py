"""A worker killed by a signal (as the OOM killer does) ends the run with `WorkerDied` carrying where
it died, leaves no worker behind, and the failed run resumes exactly once with reducers intact. A
killed launcher takes its workers and forkserver with it."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import helpers
import psutil
import pytest

import nbbatch
from nbbatch import WorkerDied, torch_batch_process

pytestmark = pytest.mark.timeout(150)

N, BS, KILL_AT = 40, 2, 13  # sample 13: global batch 6 -> rank 0, batch_idx 3 with 2 workers


class DiesOnce(helpers.Summing):
    """SIGKILLs its own process on the batch holding sample $NBBATCH_TEST_KILL_AT (unset: never)."""

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        time.sleep(0.02)
        if int(os.environ.get("NBBATCH_TEST_KILL_AT", "-1")) in batch.tolist():
            os.kill(os.getpid(), signal.SIGKILL)
        self.reduce(batch)
        return {"value": batch * 7}


def go(store: str, workers: int, **kwargs: Any) -> nbbatch.Run:
    return torch_batch_process(DiesOnce, list(range(N)), batch_size=BS, num_processes=workers, checkpoint_interval=2,
                               store=store, run_name="oom", progress=False, **kwargs)


@pytest.mark.parametrize("on_error", ["raise", "skip"])
def test_killed_worker_fails_the_run_and_resume_completes(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, on_error: str
) -> None:
    store = str(tmp_path / "s.duckdb")
    monkeypatch.setenv("NBBATCH_TEST_KILL_AT", str(KILL_AT))
    started = time.monotonic()
    # A dead process cannot be skipped: "skip" is for exceptions, a signal still fails the run.
    with pytest.raises(WorkerDied) as info:
        go(store, 2, on_error=on_error)
    assert time.monotonic() - started < 90
    err = info.value
    assert (err.rank, err.batch_idx, err.global_batch) == (0, 3, 6)
    assert err.indices == [12, 13]
    assert "killed by SIGKILL" in str(err) and "run_name='oom'" in str(err)

    helpers.poll(lambda: helpers.worker_processes() == [], 15, "the surviving worker to be stopped too", every=0.1)

    run = nbbatch.open_run("oom", store=store)
    assert run.status == "failed" and "SIGKILL" in (run.error or "")
    committed = [s for (s,) in run.outputs().project("sample_index").fetchall()]
    assert KILL_AT not in committed and len(committed) == len(set(committed))

    # Resume with another worker count once the cause is gone.
    monkeypatch.delenv("NBBATCH_TEST_KILL_AT")
    resumed = go(store, 3, on_error=on_error)
    assert resumed.id == run.id and resumed.status == "done"
    assert [s for (s,) in resumed.outputs().project("sample_index").fetchall()] == list(range(N))
    assert [v for (v,) in resumed.outputs().project("value").fetchall()] == [7 * i for i in range(N)]
    assert sorted(g for (g,) in resumed.batches().project("global_batch").fetchall()) == list(range(N // BS))
    assert resumed.reduced_metrics == {"sum": sum(range(N)), "order": list(range(N))}


JOB = pathlib.Path(__file__).resolve().parent / "scripts" / "signal_job.py"


def test_killed_launcher_takes_its_workers_and_forkserver_along(tmp_path: pathlib.Path) -> None:
    """SIGKILL of the launcher (OOM killer, `kill -9`): workers see their control pipe close and leave;
    the forkserver leaves once nobody holds its "alive" pipe. Nothing of the run is alive 5 s later."""
    store, tag = tmp_path / "s.duckdb", helpers.new_tag()
    env = {**os.environ, helpers.TAG: tag, "NBBATCH_TEST_SLEEP": "0.1", "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, str(JOB), str(store), "killed", "200", "2"], cwd=tmp_path, env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def running() -> list[psutil.Process]:
        procs = helpers.tagged(tag)
        # Both workers, under the server they start from (a zygote or the forkserver).
        return procs if len(helpers.worker_processes(job.pid)) >= 2 else []

    def committed() -> bool:
        return bool(helpers.committed(store, "killed")) and bool(running())

    try:
        helpers.poll(committed, 90, "the run to commit")
        job.kill()
        job.wait(10)
        left = helpers.leftovers(tag, None, within=5.0)
        assert not left, f"alive 5 s after the launcher was killed: {helpers.describe(left)}"
    finally:
        helpers.kill_tagged(tag)
        if job.poll() is None:
            job.kill()
    assert nbbatch.open_run("killed", store=str(store)).status == "interrupted"
