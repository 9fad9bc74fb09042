"""Exactly-once as a property: kill a run anywhere, resume it with another worker count, and the store
holds every sample once, with reducers over the whole dataset.

For each kill (SIGKILL of one worker, or of the launcher), hypothesis draws the dataset size,
batch size, worker count (1-3), checkpoint interval and where the kill lands: a worker blocks inside
``process_batch`` at a drawn ``batch_idx`` (scripts/fault_procs.py) and is killed there, or its
launcher is. Worker kills run the launcher in this process (its forkserver stays warm); launcher
kills need a launcher of their own, so they run ``fault_job.py`` in a subprocess. The resume always
runs here, with another worker count (drawn). Derandomized, so every CI run draws the same examples.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, event, example, given, settings
from hypothesis import strategies as st

import helpers
import nbbatch
from fault_procs import FAULT_ENV, FaultJob, numbers
from nbbatch import WorkerDied, torch_batch_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

JOB = helpers.SCRIPTS / "fault_job.py"
_counter = itertools.count()


@st.composite
def plans(draw: Any) -> dict[str, Any]:
    n = draw(st.integers(1, 60))
    bs = draw(st.integers(1, 5))
    workers = draw(st.sampled_from([2, 3, 1]))  # integers(1, 3) would mostly draw 1
    total = -(-n // bs)
    ranks_with_data = min(workers, total)
    rank = draw(st.integers(0, ranks_with_data - 1))
    batches_of_rank = len(range(rank, total, workers))
    return {
        "n": n, "bs": bs, "workers": workers, "interval": draw(st.integers(1, 4)),
        "rank": rank,
        "at": draw(st.integers(0, batches_of_rank - 1)),
        "resume_workers": draw(st.sampled_from([w for w in (1, 2, 3) if w != workers])),
    }


def fault_spec(plan: dict[str, Any], marks: pathlib.Path) -> dict[str, Any]:
    return {"action": "wait", "hook": "process_batch", "at": plan["at"], "rank": plan["rank"], "dir": str(marks)}


def waiter(marks: pathlib.Path, rank: int) -> int:
    def read() -> int | None:
        try:
            return int((marks / f"reached-{rank}").read_text())
        except (FileNotFoundError, ValueError):
            return None

    return helpers.poll(read, 120, f"rank {rank} to reach its kill point")


def kill_worker_in_process(plan: dict[str, Any], store: str, marks: pathlib.Path, monkeypatch: Any) -> None:
    """Launcher here; a thread SIGKILLs the blocked worker; the run fails with WorkerDied."""
    errors: list[BaseException] = []

    def killer() -> None:
        try:
            os.kill(waiter(marks, plan["rank"]), signal.SIGKILL)
            (marks / "go").touch()
        except BaseException as exc:  # surfaced below
            errors.append(exc)
            (marks / "go").touch()

    thread = threading.Thread(target=killer, daemon=True)
    with monkeypatch.context() as m:
        m.setenv(FAULT_ENV, json.dumps(fault_spec(plan, marks)))
        thread.start()
        with pytest.raises(WorkerDied) as info:
            torch_batch_process(FaultJob, numbers(plan["n"]), batch_size=plan["bs"], num_processes=plan["workers"],
                                checkpoint_interval=plan["interval"], store=store, run_name="p", progress=False)
    thread.join(30)
    assert not errors, errors
    assert info.value.rank == plan["rank"] and "SIGKILL" in str(info.value)


def kill_launcher(plan: dict[str, Any], store: str, marks: pathlib.Path) -> None:
    """Launcher in a subprocess, SIGKILLed while a worker blocks; its workers must not outlive it."""
    tag = helpers.new_tag()
    env = {**os.environ, FAULT_ENV: json.dumps(fault_spec(plan, marks)), helpers.TAG: tag, "OMP_NUM_THREADS": "1",
           "NBBATCH_STORE": ""}
    cmd = [sys.executable, str(JOB), "--store", store, "--name", "p", "--samples", str(plan["n"]), "--batch-size",
           str(plan["bs"]), "--interval", str(plan["interval"]), "--workers", str(plan["workers"])]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        waiter(marks, plan["rank"])
        proc.kill()
        (marks / "go").touch()
        assert proc.wait(timeout=30) == -signal.SIGKILL
        left = helpers.leftovers(tag, proc.pid, within=5.0)
        assert not left, f"processes outlived their SIGKILLed launcher: {helpers.describe(left)}"
    finally:
        if proc.poll() is None:
            proc.kill()
        helpers.kill_tagged(tag)


@settings(max_examples=8, deadline=None, derandomize=True, database=None, phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@example(plan={"n": 47, "bs": 3, "workers": 3, "interval": 2, "rank": 2, "at": 3, "resume_workers": 2})
@example(plan={"n": 40, "bs": 2, "workers": 2, "interval": 3, "rank": 1, "at": 5, "resume_workers": 1})
@given(plan=plans())
@pytest.mark.parametrize("kill", ["worker", "launcher"])  # each kind gets its own examples
def test_killed_anywhere_then_resumed_stores_every_sample_once(
    kill: str, plan: dict[str, Any], tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = {**plan, "kill": kill}
    # Shrinking is off (phases): each example starts real processes, and the drawn plan is the report.
    event(f"{plan['workers']} -> {plan['resume_workers']} workers")
    root = tmp_path / f"example-{next(_counter)}"
    marks = root / "marks"
    marks.mkdir(parents=True)
    store = str(root / "s.duckdb")
    if plan["kill"] == "worker":
        kill_worker_in_process(plan, store, marks, monkeypatch)
    else:
        kill_launcher(plan, store, marks)
    run = nbbatch.open_run("p", store=store)
    committed = helpers.committed_unique(store, "p")
    assert committed < plan["n"], f"the kill landed after the last commit: {plan}"

    resumed = torch_batch_process(FaultJob, numbers(plan["n"]), batch_size=plan["bs"],
                                  num_processes=plan["resume_workers"], checkpoint_interval=plan["interval"],
                                  store=store, run_name="p", progress=False)
    assert resumed.id == run.id and resumed.status == "done", plan
    helpers.check_exactly_once(store, "p", plan["n"], plan["bs"])
