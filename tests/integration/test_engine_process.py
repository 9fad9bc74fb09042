"""Process hygiene of the local launcher: the forkserver leaves with its caller, fast, and nothing lingers."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

pytestmark = pytest.mark.timeout(120)

PROBE = """
import atexit, signal, sys
import multiprocessing.forkserver  # as in the forkserver, whose command line imports it first
atexit.register(lambda: print("teardown ran", flush=True))  # stands for torch's atexit hooks
import nbbatch._launch.forkserver
print("main done", signal.getsignal(signal.SIGTERM) is signal.SIG_IGN, flush=True)
"""


@pytest.mark.parametrize("where,teardown", [("forkserver", False), ("caller", True), ("someone-else", True)])
def test_only_the_forkserver_skips_interpreter_teardown_and_sigterm(where: str, teardown: bool) -> None:
    """Only a process spawned by `ensure_started` (marked with its parent's pid) gets the forkserver's boot."""
    env = dict(os.environ)
    env.pop("NBBATCH_FORKSERVER", None)
    if where != "caller":
        env["NBBATCH_FORKSERVER"] = str(os.getpid() if where == "forkserver" else os.getpid() + 1)
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=100, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"main done {not teardown}"
    assert ("teardown ran" in done.stdout) is teardown


SCRIPT = """
import sys
from nbbatch import TorchBatchProcessor, torch_batch_process

class Echo(TorchBatchProcessor):
    def __init__(self, context):
        pass
    def process_batch(self, batch, batch_idx):
        print(f"worker saw {batch.tolist()}", flush=True)
        return batch

run = torch_batch_process(Echo, list(range(8)), batch_size=4, num_processes=2, store=sys.argv[1], progress=False)
print("status", run.status, run.counts["rows"], flush=True)
"""


def test_script_output_is_complete_and_no_process_outlives_it(tmp_path: pathlib.Path) -> None:
    (tmp_path / "job.py").write_text(textwrap.dedent(SCRIPT))
    proc = subprocess.Popen([sys.executable, "job.py", str(tmp_path / "s.duckdb")], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    kids: dict[int, psutil.Process] = {}
    while proc.poll() is None:  # collect the forkserver, resource tracker and workers while they live
        try:
            kids.update({k.pid: k for k in psutil.Process(proc.pid).children(recursive=True)})
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = proc.communicate(timeout=60)  # returns once every holder of the pipes has exited
    assert proc.returncode == 0, err
    # Two workers write to one pipe concurrently, so their lines may interleave.
    assert sorted(re.findall(r"worker saw \[[0-9, ]+\]", out)) == [
        "worker saw [0, 1, 2, 3]", "worker saw [4, 5, 6, 7]"
    ], "workers' prints reach the caller's stdout"
    assert out.splitlines()[-1] == "status done 8"
    assert kids, "the launcher started child processes"
    gone, alive = psutil.wait_procs(list(kids.values()), timeout=30)
    assert not alive, f"processes outlived the script: {alive}"
