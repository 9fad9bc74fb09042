"""The same script under torchrun: one node with two processes, and two agents acting as two nodes.

Each torchrun process is one worker; rank 0 alone writes the store. The test polls the store
read-only while the job runs, as a dashboard would.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
from typing import Any

import pytest
from helpers import free_port, poll

from nbbatch._errors import StoreError
from nbbatch._store import reader

pytestmark = pytest.mark.slow

JOB = pathlib.Path(__file__).resolve().parent / "scripts" / "torchrun_job.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def start(launcher: list[str], store: pathlib.Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*TORCHRUN, *launcher, str(JOB), "--store", str(store), *args], cwd=store.parent,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )


def state(store: pathlib.Path, name: str) -> dict[str, Any] | None:
    """The run's row plus per-rank live progress, read-only; None until readable."""
    try:
        with reader.reading(str(store)) as con:
            s = reader.run_summary(con, name)
            s["progress"] = {
                rank: batches for rank, batches in con.execute(
                    "SELECT rank, batches FROM progress WHERE run_id = ? AND attempt = ?", [s["run_id"], s["attempt"]]
                ).fetchall()
            }
            return s
    except (StoreError, KeyError):
        return None


def watch(procs: list[subprocess.Popen[str]], store: pathlib.Path, name: str, timeout: float = 150) -> list[dict[str, Any]]:
    """Poll the store until every process exits; returns the states seen while the run was running."""
    seen = []

    def ended() -> bool:
        if all(p.poll() is not None for p in procs):
            return True
        s = state(store, name)
        if s is not None and s["status"] == "running":
            seen.append(s)
        return False

    poll(ended, timeout, "the torchrun job to finish (hang?)", every=0.2)
    return seen


def finish(procs: list[subprocess.Popen[str]]) -> list[str]:
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=30)[0])
        finally:
            if p.poll() is None:
                p.kill()
    return outs


def check_exactly_once(store: pathlib.Path, name: str, n: int) -> dict[str, Any]:
    s = state(store, name)
    assert s is not None and s["status"] == "done", s
    assert s["world_size"] == 2
    assert s["reduced_metrics"] == {"total": sum(range(n))}
    with reader.reading(str(store)) as con:
        rows = con.execute(
            f"SELECT count(*), count(DISTINCT sample_index), min(sample_index), max(sample_index), "
            f"sum(CASE WHEN y = 2 * sample_index THEN 1 ELSE 0 END) FROM outputs_{s['run_id']}"
        ).fetchall()
        ranks = con.execute(f"SELECT DISTINCT rank FROM outputs_{s['run_id']} ORDER BY rank").fetchall()
        workers = con.execute(f"SELECT count(*) FROM outputs_{s['run_id']} WHERE worker <> rank").fetchall()
        progress = con.execute(
            "SELECT rank, batches FROM progress WHERE run_id = ? AND attempt = ? ORDER BY rank", [s["run_id"], s["attempt"]]
        ).fetchall()
    assert rows == [(n, n, 0, n - 1, n)]
    assert ranks == [(0,), (1,)]
    assert workers == [(0,)], "the `rank` column must match get_distributed_rank() of the process"
    assert [r for r, b in progress] == [0, 1] and all(b > 0 for _, b in progress)
    return s


@pytest.mark.timeout(240)
def test_one_node_two_processes(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    proc = start(["--standalone", "--nproc-per-node", "2"], store, "--samples", "96", "--batch-size", "4",
                 "--checkpoint-interval", "3", "--name", "single", env={"NBBATCH_TEST_SLEEP": "0.1"})
    seen = watch([proc], store, "single")
    out = finish([proc])[0]
    assert proc.returncode == 0, out
    assert "NBBATCH_RESULT done" in out
    check_exactly_once(store, "single", 96)
    assert any(s["progress"].get(1, 0) > 0 for s in seen), "rank 1's progress never reached the store while running"

    # Naming the run with another fingerprint fails on every rank with the same error, and no rank hangs.
    other = start(["--standalone", "--nproc-per-node", "2"], store, "--samples", "95", "--name", "single")
    out = finish([other])[0]
    assert other.returncode != 0
    for rank in (0, 1):
        assert f"[rank{rank}]: nbbatch._errors.ResumeMismatch: run 'single'" in out, out


@pytest.mark.timeout(240)
def test_two_agents_as_two_nodes_with_live_progress(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    port = str(free_port())
    procs = [
        start(["--nnodes", "2", "--node-rank", str(node), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
               "--master-port", port], store, "--samples", "64", "--batch-size", "4",
              # one checkpoint at the end: anything seen earlier came through live progress
              "--checkpoint-interval", "1000", "--name", "nodes", env={"NBBATCH_TEST_SLEEP": "0.25"})
        for node in (0, 1)
    ]
    seen = watch(procs, store, "nodes")
    outs = finish(procs)
    assert [p.returncode for p in procs] == [0, 0], outs
    assert "NBBATCH_RESULT done" in outs[0]
    check_exactly_once(store, "nodes", 64)
    live = [s for s in seen if s["committed_batches"] == 0 and s["progress"].get(1, 0) > 0]
    assert live, f"rank 1's progress was not visible between checkpoints: {[s['progress'] for s in seen]}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_failing_rank_ends_the_job_then_resume_completes(tmp_path: pathlib.Path, failing_rank: int) -> None:
    store = tmp_path / "s.duckdb"
    # Sample 4*(4 + r) is in global batch 4 + r, which rank r processes.
    fail_at = str(4 * (4 + failing_rank))
    args = ["--samples", "80", "--batch-size", "4", "--checkpoint-interval", "2", "--name", "crash", "--processor", "Failing"]
    proc = start(["--standalone", "--nproc-per-node", "2"], store, *args,
                 env={"NBBATCH_TEST_FAIL_AT": fail_at, "NBBATCH_TEST_SLEEP": "0.05"})
    watch([proc], store, "crash")
    out = finish([proc])[0]
    assert proc.returncode != 0, out
    s = state(store, "crash")
    assert s is not None and s["status"] == "failed", s
    error = str(s["error"])
    assert f"worker rank {failing_rank} failed in process_batch" in error
    assert f"ValueError: cannot process sample {fail_at}" in error and "Traceback" in error
    with reader.reading(str(store)) as con:
        errors = con.execute("SELECT rank, exc_type, traceback FROM errors WHERE run_id = ?", [s["run_id"]]).fetchall()
    assert [(r, t) for r, t, _ in errors] == [(failing_rank, "ValueError")]
    assert "process_batch" in errors[0][2]

    again = start(["--standalone", "--nproc-per-node", "2"], store, *args, env={"NBBATCH_TEST_FAIL_AT": "-1"})
    watch([again], store, "crash")
    out = finish([again])[0]
    assert again.returncode == 0, out
    s = check_exactly_once(store, "crash", 80)
    assert s["attempt"] == 2


@pytest.mark.timeout(240)
def test_killed_rank_fails_the_run_without_hanging(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    proc = start(["--standalone", "--nproc-per-node", "2"], store, "--samples", "80", "--batch-size", "4",
                 "--checkpoint-interval", "2", "--name", "killed", "--processor", "SelfKilling",
                 env={"NBBATCH_TEST_KILL_AT": "20", "NBBATCH_TEST_SLEEP": "0.05"})  # global batch 5: rank 1
    watch([proc], store, "killed")
    out = finish([proc])[0]
    assert proc.returncode != 0, out
    s = state(store, "killed")
    assert s is not None and s["status"] == "failed", s
    assert "lost contact" in str(s["error"]) and "rank 1 stopped reporting" in str(s["error"])
    assert 0 < s["committed_batches"] < 20


UNCLEAN = ("terminate called", "SIGABRT", "Aborted", "nanobind", "leaked", "NOT been destroyed", "Traceback",
           "ChildFailedError")


@pytest.mark.timeout(180)
def test_a_completed_job_exits_0_without_abort_or_leak_messages(tmp_path: pathlib.Path) -> None:
    """A finished job's ranks leave cleanly: no abort in interpreter teardown (gloo threads), no leaked DuckDB objects.

    The abort showed under load only; `benchmarks/torchrun_clean_exit.py` repeats this 20 times.
    """
    store = tmp_path / "s.duckdb"
    done = subprocess.run(
        [*TORCHRUN, "--standalone", "--nproc-per-node", "2", str(JOB), "--store", str(store), "--samples", "16",
         "--batch-size", "4", "--checkpoint-interval", "1", "--name", "clean"],
        cwd=tmp_path, capture_output=True, text=True, timeout=150, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert done.returncode == 0, done.stderr
    assert "NBBATCH_RESULT done" in done.stdout
    noise = [line for line in (done.stdout + done.stderr).splitlines() if any(u in line for u in UNCLEAN)]
    assert not noise, "\n".join(noise)
