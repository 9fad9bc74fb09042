"""A launcher SIGKILLed mid-run (OOM killer, `kill -9`): its run reads `interrupted`, and resumes exactly once.

The launcher is `nbbatch run` (CLI), a plain `python script.py`, or rank 0 of a 2-rank torchrun
job (the store's writer there). After the kill: `open_run`, `nbbatch runs` and `nbbatch show`
say `interrupted` within seconds; a `Run.wait()` that was blocking returns; nothing of a local run
is alive 5 s later (under torchrun, its agent stops the other rank: `test_fault_matrix` times
that); resuming by name (`nbbatch resume`, the same script again) stores every sample exactly once
with reducers over the whole dataset.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # `helpers`, also without tests/conftest.py
from helpers import (  # noqa: E402
    SCRIPTS,
    TAG,
    check_exactly_once,
    describe,
    kill_tagged,
    leftovers,
    nbbatch_cli,
    new_tag,
    poll,
    tagged,
)

import nbbatch  # noqa: E402

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

N, BS, INTERVAL, WORKERS = 120, 2, 2, 2
PACE = 0.25  # seconds per batch before the kill, so that it lands mid-run
JOB = SCRIPTS / "fault_job.py"
PROCS = SCRIPTS / "fault_procs.py"


def command(how: str, store: pathlib.Path, name: str) -> list[str]:
    if how == "cli":
        return [sys.executable, "-m", "nbbatch", "run", f"{PROCS}:FaultJob", "--dataset", f"{PROCS}:numbers",
                "--dataset-arg", f"n={N}", "--batch-size", str(BS), "--checkpoint-interval", str(INTERVAL),
                "--processes", str(WORKERS), "--name", name, "--store", str(store), "--no-progress"]
    job = [str(JOB), "--store", str(store), "--name", name, "--samples", str(N), "--batch-size", str(BS),
           "--interval", str(INTERVAL)]
    if how == "torchrun":
        torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable))
        assert torchrun, "torchrun comes with torch"
        return [torchrun, "--standalone", f"--nproc-per-node={WORKERS}", *job]
    return [sys.executable, *job, "--workers", str(WORKERS)]


def start(how: str, store: pathlib.Path, name: str, tag: str, log: pathlib.Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, TAG: tag, "NBBATCH_FAULT": json.dumps({"pace": PACE}), "PYTHONUNBUFFERED": "1",
           "OMP_NUM_THREADS": "1"}
    with open(log, "wb") as out:  # a file, not a pipe: a full pipe would stall the run
        return subprocess.Popen(command(how, store, name), cwd=store.parent, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def writer_process(how: str, launcher: subprocess.Popen[bytes], tag: str) -> psutil.Process:
    """The process holding the store's writer lock: the launcher, or rank 0 under torchrun."""
    if how != "torchrun":
        return psutil.Process(launcher.pid)

    def rank0() -> psutil.Process | None:
        for proc in tagged(tag):
            try:
                env = proc.environ()
                if env.get("RANK") == "0" and env.get("NBBATCH_LOCAL_WORKER") != "1" and str(JOB) in proc.cmdline():
                    return proc
            except psutil.Error:
                continue
        return None

    return poll(rank0, 60, "torchrun's rank 0")


def committed(store: pathlib.Path, name: str) -> int:
    try:
        run = nbbatch.open_run(name, store=str(store))
        return run.counts["committed_batches"] if run.status == "running" else 0
    except (nbbatch.RunNotFound, nbbatch.StoreError):
        return 0  # the store or the run row is not there yet


@pytest.mark.parametrize("how", ["cli", "script", "torchrun"])
def test_a_killed_launcher_reads_interrupted_and_resumes_exactly_once(how: str, tmp_path: pathlib.Path) -> None:
    store, name, tag = tmp_path / "s.duckdb", f"killed-{how}", new_tag()
    launcher = start(how, store, name, tag, tmp_path / "attempt1.log")
    try:
        victim = writer_process(how, launcher, tag)
        poll(lambda: committed(store, name) >= 4, 120, "4 committed batches")
        waiting = nbbatch.open_run(name, store=str(store))
        returned: list[float] = []

        def wait() -> None:
            waiting.wait(poll=0.1)  # no timeout: it must return by itself
            returned.append(time.monotonic())

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()

        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait(timeout=30)
        poll(lambda: nbbatch.open_run(name, store=str(store)).status == "interrupted", 5,
             "open_run to say interrupted")
        seen_after = time.monotonic() - killed_at
        waiter.join(timeout=5)
        assert returned, "Run.wait() still blocks on an interrupted run"
        assert returned[0] - killed_at < 3.0, f"Run.wait() returned {returned[0] - killed_at:.1f}s after the kill"

        left = leftovers(tag, launcher.pid, within=max(0.0, killed_at + 5.0 - time.monotonic()))
        if how != "torchrun":  # there torchrun's agent stops the other rank; test_fault_matrix times that
            assert not left, f"alive 5 s after the kill: {describe(left)}"
        launcher.wait(timeout=60)
    finally:
        kill_tagged(tag)
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait(timeout=30)

    run = nbbatch.open_run(name, store=str(store))
    assert run.status == "interrupted" and [r.status for r in nbbatch.list_runs(store=str(store))] == ["interrupted"]
    assert "ended without marking the run" in (run.error or "")
    assert 4 <= run.counts["committed_batches"] < N // BS
    listed = nbbatch_cli("runs", "--store", str(store))
    assert listed.returncode == 0 and any(line.split()[:2] == [name, "interrupted"] for line in listed.stdout.splitlines()), listed
    shown = nbbatch_cli("show", name, "--store", str(store))
    assert shown.returncode == 0, shown.stderr
    assert "status:" in shown.stdout and any(
        line.split() == ["status:", "interrupted"] for line in shown.stdout.splitlines()), shown.stdout
    assert "ended without marking the run" in shown.stdout

    resume_tag = new_tag()
    env = {**os.environ, TAG: resume_tag, "OMP_NUM_THREADS": "1"}
    env.pop("NBBATCH_FAULT", None)
    if how == "cli":
        again = subprocess.run([sys.executable, "-m", "nbbatch", "resume", name, "--store", str(store), "--no-progress"],
                               cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    else:
        again = subprocess.run(command(how, store, name), cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=240)
        assert "NBBATCH_RESULT done" in again.stdout, again.stdout + again.stderr
    assert again.returncode == 0, again.stdout + again.stderr
    resumed = check_exactly_once(str(store), name, N, BS)
    assert resumed.summary["attempt"] == 2
    assert not leftovers(resume_tag, None, within=5.0)
    print(f"{how}: interrupted seen {seen_after:.2f}s after the kill; Run.wait() returned "
          f"{returned[0] - killed_at:.2f}s after it")

