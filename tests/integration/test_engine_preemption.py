"""How a local run ends: `Run.stop()` and SIGTERM preempt it at a checkpoint, a finished script lets go at once.

Observed only through nbbatch's public behaviour: outputs rows, `report_metrics` rows and the
run's status and reduced metrics in a real DuckDB store, with real worker processes; signals go to
a real script (`scripts/signal_job.py`) as a scheduler or container runtime sends them.
"""

from __future__ import annotations

import io
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import helpers
import pytest

import nbbatch
from nbbatch import torch_batch_process
from nbbatch._progress import PlainReporter, ProgressSnapshot
from nbbatch._ui.widgets import WidgetReporter

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

N, BS, INTERVAL = 120, 2, 3


class Slow(helpers.Summing):
    """Sleeps $NBBATCH_TEST_SLEEP per batch; reduces a sum and the global order; reports on_finish."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.sleep = float(os.environ.get("NBBATCH_TEST_SLEEP", "0"))

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        time.sleep(self.sleep)
        self.reduce(batch)
        return {"value": batch * 10}

    def on_finish(self) -> None:
        self.context.report_metrics("lifecycle", 0, {"finish": 1})


def go(store: pathlib.Path, workers: int, name: str) -> nbbatch.Run:
    return torch_batch_process(Slow, list(range(N)), batch_size=BS, num_processes=workers,
                               checkpoint_interval=INTERVAL, store=str(store), run_name=name, progress=False)


def stop_when_committed(store: pathlib.Path, name: str, at_least: int, timeout: float) -> threading.Thread:
    """Call `Run.stop()` from another thread once `at_least` batches are committed."""
    seen: list[BaseException] = []

    def body() -> None:
        try:
            helpers.poll(lambda: helpers.committed(store, name) >= at_least, timeout,
                         f"{at_least} committed batches of run {name!r}", every=0.05)
            nbbatch.open_run(name, store=str(store)).stop()
        except BaseException as exc:  # surfaced by the test below
            seen.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.seen = seen  # type: ignore[attr-defined]
    thread.start()
    return thread


def finishes(run: nbbatch.Run) -> dict[int, int]:
    rows = run.metrics().filter("name = 'finish'").aggregate("rank, count(*)").fetchall()
    return {int(r): int(c) for r, c in rows}


@pytest.mark.parametrize("workers,resume_workers", [(2, 2), (2, 1)], ids=["same-world", "fewer-workers"])
def test_stop_preempts_then_resume_matches_a_clean_run(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, workers: int, resume_workers: int
) -> None:
    store = tmp_path / "s.duckdb"
    monkeypatch.setenv("NBBATCH_TEST_SLEEP", "0.05")
    stopper = stop_when_committed(store, "p", at_least=2 * INTERVAL, timeout=120)
    run = go(store, workers, "p")
    stopper.join(10)
    assert not stopper.seen, stopper.seen  # type: ignore[attr-defined]

    # Preempted at a checkpoint: committed work is a whole number of checkpoint steps, no on_finish.
    assert run.status == "preempted"
    committed = run.counts["committed_batches"]
    total = -(-N // BS)
    assert 0 < committed < total, "the stop must land mid-run"
    assert committed % (INTERVAL * workers) == 0, "commits happen per checkpoint step of every worker"
    assert finishes(run) == {}, "on_finish is not called on preemption"
    samples = [s for (s,) in run.outputs().project("sample_index").fetchall()]
    assert samples == list(range(len(samples))), "the committed prefix is whole global batches 0..k"
    # Reduced metrics over what was processed (the committed batches).
    assert run.reduced_metrics["sum"] == sum(samples)
    assert run.reduced_metrics["order"] == samples

    # Resume (possibly with another worker count): done, exactly once, metrics equal a clean run's.
    monkeypatch.setenv("NBBATCH_TEST_SLEEP", "0")
    resumed = go(store, resume_workers, "p")
    assert resumed.id == run.id and resumed.status == "done"
    assert [s for (s,) in resumed.outputs().project("sample_index").fetchall()] == list(range(N))
    assert [v for (v,) in resumed.outputs().project("value").fetchall()] == [10 * i for i in range(N)]
    assert sorted(g for (g,) in resumed.batches().project("global_batch").fetchall()) == list(range(total))
    assert finishes(resumed) == {r: 1 for r in range(resume_workers)}
    clean = go(store, resume_workers, "clean")
    assert clean.status == "done"
    assert resumed.reduced_metrics == clean.reduced_metrics == {"sum": sum(range(N)), "order": list(range(N))}

    # batch_idx continues on resume: it is the position in the worker's shard of that attempt's
    # world (g = batch_idx * W + rank), never restarted at 0.
    rows = resumed.sql("SELECT DISTINCT rank, batch_idx, global_batch FROM outputs ORDER BY global_batch").fetchall()
    assert len(rows) == total
    for rank, batch_idx, g in rows:
        world = workers if g < committed else resume_workers
        assert (rank, batch_idx) == (g % world, g // world), (rank, batch_idx, g)
    assert min(k for _, k, g in rows if g >= committed) == committed // resume_workers > 0


# -- a real script, signalled as schedulers do ------------------------------------------------------
JOB = pathlib.Path(__file__).resolve().parent / "scripts" / "signal_job.py"
JOB_SAMPLES = 200


def start_job(store: pathlib.Path, name: str, tag: str, sleep: float, samples: int = JOB_SAMPLES,
              loader_workers: int = 0) -> subprocess.Popen[str]:
    """The job as a session (and process group) leader, as a batch system starts it."""
    env = {**os.environ, helpers.TAG: tag, "NBBATCH_TEST_SLEEP": str(sleep), "OMP_NUM_THREADS": "1",
           "NBBATCH_TEST_LOADER_WORKERS": str(loader_workers)}
    return subprocess.Popen([sys.executable, str(JOB), str(store), name, str(samples), "2"], cwd=store.parent,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


@pytest.mark.parametrize("target", ["group", "every-process", "every-process-dataloader-workers"])
def test_sigterm_preempts_commits_and_leaves_nothing(tmp_path: pathlib.Path, target: str) -> None:
    """`kill -TERM -PGID`, or SIGTERM to the launcher, forkserver and every worker (SLURM, containers),
    DataLoader worker processes (``dataloader_kwargs={"num_workers": 2}``) included."""
    store, tag = tmp_path / "s.duckdb", helpers.new_tag()
    loader_workers = 2 if target.endswith("dataloader-workers") else 0
    job = start_job(store, "term", tag, sleep=0.1, loader_workers=loader_workers)
    try:
        helpers.poll(lambda: helpers.committed(store, "term") >= 4, 90, "the first commits")
        processes = helpers.tagged(tag)
        # The server workers start from (a zygote or the forkserver): the job's child with children.
        servers = {p.pid for p in processes if p.ppid() == job.pid and any(q.ppid() == p.pid for q in processes)}
        assert servers, helpers.describe(processes)
        if loader_workers:  # each of the 2 workers has its DataLoader's processes, and all get the SIGTERM
            workers = [p for p in processes if p.ppid() in servers]
            # The leaves under each worker (its DataLoader may start them from a forkserver of its own).
            loaders = [c for w in workers for c in w.children(recursive=True) if not c.children()]
            assert len(loaders) == 2 * loader_workers, helpers.describe(processes)
        if target == "group":
            os.killpg(job.pid, signal.SIGTERM)
        else:
            for proc in processes:
                proc.send_signal(signal.SIGTERM)
        out, err = job.communicate(timeout=60)
        assert job.returncode == 128 + signal.SIGTERM, err
        assert "WorkerDied" not in err, err
        if not loader_workers:
            # With DataLoader workers, about 1 run in 9 prints multiprocessing's own finalizer traceback
            # (`os.unlink` of a `/tmp/pymp-*/listener-*` socket whose folder is already gone) while the run
            # still ends preempted with exit 143 and nothing left: an open item, not part of the contract.
            assert "Traceback" not in err, err
        left = helpers.leftovers(tag, job.pid, within=5.0)
        assert not left, f"processes outlived the run: {helpers.describe(left)}"
    finally:
        helpers.kill_tagged(tag)
    run = nbbatch.open_run("term", store=str(store))
    assert run.status == "preempted", (run.status, run.error)
    kept = run.counts["committed_batches"]
    assert 0 < kept < JOB_SAMPLES // 2 and kept % 4 == 0, "committed whole checkpoint steps of both workers"
    assert helpers.committed_unique(str(store), "term") == 2 * kept

    resumed = start_job(store, "term", tag, sleep=0)
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    run = nbbatch.open_run("term", store=str(store))
    assert run.status == "done"
    samples = [s for (s,) in run.outputs().project("sample_index").fetchall()]
    assert samples == list(range(JOB_SAMPLES)), "every sample exactly once after the resume"


def test_a_finished_script_closes_its_pipes_when_it_exits(tmp_path: pathlib.Path) -> None:
    """`subprocess.run(..., capture_output=True)` and `$(...)` wait for every holder of the pipes.

    Measured from the script's own end: the launcher's exit (its interpreter teardown is the
    caller's own, whatever it imported). Before the fix the forkserver's teardown of torch held
    the pipes 0.9-4 s longer.
    """
    store, tag = tmp_path / "s.duckdb", helpers.new_tag()
    job = start_job(store, "pipes", tag, sleep=0, samples=60)
    exited: list[float] = []

    def reap() -> None:  # the launcher's exit, without reaping it (communicate() does that)
        os.waitid(os.P_PID, job.pid, os.WEXITED | os.WNOWAIT)
        exited.append(time.time())

    waiter = threading.Thread(target=reap, daemon=True)
    waiter.start()
    try:
        out, err = job.communicate(timeout=120)  # returns at end-of-file on both pipes
        eof = time.time()
        waiter.join(10)
        assert job.returncode == 0, err
        status, last_line = out.splitlines()[-1].split()[1:]
        assert status == "done"
        assert eof - exited[0] < 0.25, f"the pipes stayed open {eof - exited[0]:.2f}s after the script exited"
        left = helpers.tagged(tag)
        assert not left, f"processes outlived the script: {helpers.describe(left)}"
        print(f"last line -> launcher exit {exited[0] - float(last_line):.2f}s, -> EOF {eof - float(last_line):.2f}s")
    finally:
        helpers.kill_tagged(tag)


def _last_line_to_eof(args: list[str], cwd: pathlib.Path, env: dict[str, str]) -> float:
    """Seconds from the script's last printed line (its own clock reading) to end-of-file on both pipes."""
    proc = subprocess.run(args, cwd=cwd, capture_output=True, text=True, env=env, timeout=120)
    eof = time.time()
    assert proc.returncode == 0, proc.stderr
    return eof - float(proc.stdout.split()[-1])


def test_a_finished_script_exits_faster_than_a_bare_torch_import(tmp_path: pathlib.Path) -> None:
    """After the last line, a script that ran a job must not keep its caller longer than `import torch` alone.

    CPython's finalization walks every object torch and torchvision created, several times; nbbatch
    collects once and freezes the rest at exit (`nbbatch._launch.teardown`). Compared in the same
    test, so the machine's load cancels out.
    """
    bare, job = tmp_path / "bare.py", tmp_path / "job.py"
    bare.write_text("import time, torch, torchvision\nprint(time.time())\n")
    job.write_text(  # what a typical processor script imports, then a job through the public API
        "import runpy, sys, time, torchvision\n"
        f"sys.argv = ['job', {str(tmp_path / 's.duckdb')!r}, 'exit', '60', '2']\n"
        f"runpy.run_path({str(JOB)!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NBBATCH_TEST_SLEEP": "0"}
    bare_s = min(_last_line_to_eof([sys.executable, str(bare)], tmp_path, env) for _ in range(2))
    job_s = _last_line_to_eof([sys.executable, str(job)], tmp_path, env)
    assert job_s < bare_s, f"a finished job held its pipes {job_s:.2f}s after its last line, a bare torch import {bare_s:.2f}s"


class Recorder:
    """A `Reporter` that keeps every snapshot."""

    def __init__(self) -> None:
        self.updates: list[ProgressSnapshot] = []
        self.closed: ProgressSnapshot | None = None

    def update(self, snapshot: ProgressSnapshot) -> None:
        self.updates.append(snapshot)

    def close(self, snapshot: ProgressSnapshot) -> None:
        self.closed = snapshot


def test_the_live_display_says_it_is_starting_workers(tmp_path: pathlib.Path) -> None:
    """Before the first batch (the forkserver may still import torch) displays say what they wait for."""
    recorder = Recorder()
    run = torch_batch_process(Slow, list(range(8)), batch_size=2, num_processes=2, store=str(tmp_path / "s.duckdb"),
                              progress=recorder)
    assert run.status == "done"
    first = recorder.updates[0]
    assert first.activity == "starting 2 workers" and first.done_batches == 0
    assert recorder.closed is not None and recorder.closed.activity == ""
    assert all(s.activity in ("starting 2 workers", "starting 1 worker", "") for s in recorder.updates)
    # What the terminal and the notebook show for it.
    stream = io.StringIO()
    PlainReporter(stream=stream).update(first)
    assert "starting 2 workers" in stream.getvalue()
    widget = WidgetReporter(display=lambda *args, **kwargs: None)
    widget.update(first)
    assert "starting 2 workers" in widget.title.value
