"""Kill a run at random points (SIGKILL a worker, SIGTERM or SIGKILL the launcher), resume it with
another worker count, and check that the store holds every sample exactly once and the reduced
metrics equal a clean run's."""

from __future__ import annotations

import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import psutil
import pytest
from helpers import committed, poll, worker_processes

import nbbatch

SCRIPT = pathlib.Path(__file__).parent / "scripts" / "exactly_once_job.py"

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def start(store: pathlib.Path, n: int, bs: int, workers: int, interval: int, sleep: float) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(store), str(n), str(bs), str(workers), str(interval), str(sleep)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_killed_then_resumed_run_stores_every_sample_once(tmp_path: pathlib.Path, seed: int) -> None:
    rng = random.Random(seed)
    n, bs = rng.randint(100, 200), rng.randint(2, 5)
    workers, interval = rng.randint(1, 3), rng.randint(1, 4)
    mode = ["kill-worker", "term-launcher", "kill-launcher", "kill-worker"][seed - 1]
    store = tmp_path / "s.duckdb"
    proc = start(store, n, bs, workers, interval, 0.1)
    target = rng.randint(1, max(1, (n // bs) // 4))
    poll(lambda: committed(store, "job") >= target or proc.poll() is not None, 90, f"{target} committed batches",
         every=0.1)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    if mode == "kill-worker":
        victims = worker_processes(proc.pid)
        assert victims, "no worker to kill"
        os.kill(rng.choice(victims).pid, signal.SIGKILL)
    elif mode == "term-launcher":
        proc.send_signal(signal.SIGTERM)
    else:
        kids = worker_processes(proc.pid)
        proc.kill()
        # Workers notice their launcher is gone (control pipe) and exit: no orphans.
        gone, alive = psutil.wait_procs(kids, timeout=15)
        assert not alive, f"workers outlived their launcher: {alive}"
    out, err = proc.communicate(timeout=60)
    if mode == "kill-worker":
        assert proc.returncode != 0 and "WorkerDied" in err and "SIGKILL" in err, err[-2000:]
    elif mode == "term-launcher":
        assert proc.returncode == 143, err[-2000:]
    run = nbbatch.open_run("job", store=str(store))
    assert run.status == {"kill-worker": "failed", "term-launcher": "preempted", "kill-launcher": "interrupted"}[mode]

    # Resume with another worker count; the plan (global batches) is what counts.
    again = start(store, n, bs, 1 + workers % 3, interval, 0.0)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0 and out.strip() == "done", err[-2000:]
    run = nbbatch.open_run("job", store=str(store))
    samples = [r[0] for r in run.outputs().project("sample_index").fetchall()]
    assert samples == list(range(n)), "every sample exactly once, in dataset order"
    values = [r[0] for r in run.outputs().project("value").fetchall()]
    assert values == [3 * i for i in range(n)]
    batches = run.batches().project("global_batch").fetchall()
    assert sorted(g for (g,) in batches) == list(range(-(-n // bs)))
    assert run.reduced_metrics == {"sum": sum(range(n)), "order": list(range(n))}


def test_killed_worker_is_reported_fast_and_leaves_no_orphans(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    proc = start(store, 400, 2, 2, 2, 0.05)
    poll(lambda: committed(store, "job") >= 2, 60, "2 committed batches", every=0.1)
    victims = worker_processes(proc.pid)
    assert len(victims) == 2
    os.kill(victims[0].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "WorkerDied" in err
    assert time.monotonic() - killed_at < 30
    gone, alive = psutil.wait_procs(victims, timeout=10)
    assert not alive, "the surviving worker must be stopped too"
    assert nbbatch.open_run("job", store=str(store)).status == "failed"
