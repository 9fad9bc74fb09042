"""Where workers come from: a zygote forked from the script (fast start), or the forkserver; both behave alike.

A script's first call forks a zygote from the script itself (`nbbatch._launch.zygote`), so its
workers start without importing torch again. These tests check the mechanism end to end, not a
duration: which process a worker was forked from, that it inherited the script's imported
modules, and that the fork is safe where a plain fork is not (the script's OpenMP pool and DuckDB
threads, its open files, its random state). The same script with ``NBBATCH_ZYGOTE=0`` checks that the forkserver
path keeps working and gives workers the same environment.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from nbbatch._launch import zygote

pytestmark = pytest.mark.timeout(180)

SCRIPT = """
import json, os, sys
import torch
import nbbatch
from nbbatch import TorchBatchProcessor, torch_batch_process
from nbbatch._launch import forkserver

json._nbbatch_probe = os.getpid()  # a module attribute only a fork of this process can see
held = open(os.path.join(sys.argv[2], "held-by-the-script.txt"), "w")
torch.set_num_threads(2)
x = torch.randn(400, 400)
(x @ x + x).sum()  # this thread's OpenMP pool exists now: a plain fork of it would hang in parallel ops
import duckdb
con = duckdb.connect()  # DuckDB's own threads run in the script too
con.execute("SELECT sum(range) FROM range(3000000)").fetchall()


class Probe(TorchBatchProcessor):
    def __init__(self, context):
        pass

    def process_batch(self, batch, batch_idx):
        import json, os, torch
        y = torch.randn(400, 400)
        (y @ y + y).sum()  # parallel over the worker's 2 threads
        import duckdb
        duckdb.connect().execute("SELECT sum(range) FROM range(3000000)").fetchall()
        parent = os.getppid()
        facts = {
            "pid": os.getpid(),
            "name": open("/proc/self/comm").read().strip(),
            "parent": parent,
            "parent_name": open(f"/proc/{parent}/comm").read().strip(),
            "grandparent": int(open(f"/proc/{parent}/stat").read().rsplit(")", 1)[1].split()[1]),
            "probe": getattr(json, "_nbbatch_probe", None),
            "threads": torch.get_num_threads(),
            "seed": torch.initial_seed(),
            "files": sorted(os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
                            if os.path.exists(f"/proc/self/fd/{fd}")),
        }
        with open(os.path.join(sys.argv[2], f"worker-{batch_idx}.json"), "w") as f:
            json.dump(facts, f)
        return {"y": batch * 2}


run = torch_batch_process(Probe, torch.arange(4.0), batch_size=4, num_processes=1, store=sys.argv[1],
                          progress=False, batch_timeout=60)
print(json.dumps({"pid": os.getpid(), "status": run.status, "seed": torch.initial_seed()}), flush=True)
"""


@pytest.mark.parametrize("server", ["zygote", "forkserver"])
def test_a_scripts_worker_comes_from_the_expected_server_and_inherits_nothing_unsafe(
    tmp_path: pathlib.Path, server: str
) -> None:
    (tmp_path / "job.py").write_text(textwrap.dedent(SCRIPT))
    env = {k: v for k, v in os.environ.items() if k not in ("NBBATCH_ZYGOTE", "NBBATCH_START_METHOD")}
    if server == "forkserver":
        env["NBBATCH_ZYGOTE"] = "0"
    done = subprocess.run([sys.executable, "job.py", str(tmp_path / "s.duckdb"), str(tmp_path)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=150, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    script = json.loads(done.stdout.strip().splitlines()[-1])
    worker = json.loads((tmp_path / "worker-0.json").read_text())
    assert script["status"] == "done"

    assert worker["name"] == zygote.WORKER_NAME
    assert worker["threads"] == 2, "one worker on 2 cores runs 2 intra-op threads (the parallel matmul above)"
    if server == "zygote":
        assert worker["parent_name"] == zygote.ZYGOTE_NAME and worker["grandparent"] == script["pid"], worker
        assert worker["probe"] == script["pid"], "forked from the script: its imported modules' state is there"
    else:
        assert worker["parent_name"] != zygote.ZYGOTE_NAME and worker["probe"] is None, worker
        cmdline = pathlib.Path(f"/proc/{worker['parent']}/cmdline")
        assert not cmdline.exists() or b"multiprocessing.forkserver" in cmdline.read_bytes()
    # As after exec: none of the script's own descriptors, and a fresh random state.
    assert not any(f.startswith(str(tmp_path)) for f in worker["files"]), worker["files"]
    assert worker["seed"] != script["seed"]


ORDER_SCRIPT = """
import json, sys
import nbbatch
from nbbatch._launch import forkserver
from nbbatch._store import writer as store_writer

class Double(nbbatch.TorchBatchProcessor):
    def __init__(self, context):
        pass

    def process_batch(self, batch, batch_idx):
        return {"y": batch * 2}

seen = []
original = store_writer.StoreWriter.__init__

def observed(self, *args, **kwargs):
    seen.append(forkserver.server_kind())
    original(self, *args, **kwargs)

store_writer.StoreWriter.__init__ = observed
run = nbbatch.torch_batch_process(Double, list(range(8)), batch_size=4, num_processes=2, store=sys.argv[1],
                                  progress=False)
print(json.dumps({"status": str(run.status), "seen": seen, "after": forkserver.server_kind()}))
"""


def test_the_zygote_is_forked_before_the_store_opens_and_retired_after_the_call(tmp_path: pathlib.Path) -> None:
    """The call forks its zygote first thing, so nothing of the store is open in it, and retires it at the end.

    A fresh script as the caller (this test process may run threads, e.g. IPython's, that rule a
    zygote out). Needs ``ensure_started()`` at the start of ``run_local`` and ``release()`` once its
    workers are gone.
    """
    env = {k: v for k, v in os.environ.items() if k != "NBBATCH_ZYGOTE"}
    done = subprocess.run([sys.executable, "-c", ORDER_SCRIPT, str(tmp_path / "s.duckdb")], capture_output=True,
                          text=True, timeout=150, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["status"] == "done"
    assert result["seen"] and result["seen"][0] == "zygote", f"the server running when the store opened: {result}"
    assert result["after"] is None, "the call's zygote is retired once its workers are gone"


UNSAFE_SCRIPT = """
import os, sys, threading, types
import torch
from nbbatch._launch import zygote

assert zygote.unusable() is None, zygote.unusable()
release = threading.Event()
other = threading.Thread(target=release.wait, name="holds-a-lock-maybe")
other.start()
try:
    assert "holds-a-lock-maybe" in (zygote.unusable() or ""), zygote.unusable()
finally:
    release.set()
    other.join()
assert zygote.unusable() is None
os.environ["NBBATCH_ZYGOTE"] = "0"
assert zygote.unusable() == "NBBATCH_ZYGOTE=0" and not zygote.expected()
del os.environ["NBBATCH_ZYGOTE"]
sys.modules["ipykernel"] = types.ModuleType("ipykernel")
assert zygote.unusable() == "the caller is a Jupyter kernel" and not zygote.expected()
print("ok")
"""


def test_no_zygote_where_a_fork_is_unsafe_or_unwanted(tmp_path: pathlib.Path) -> None:
    """Other Python threads, Jupyter kernels and ``NBBATCH_ZYGOTE=0`` get the forkserver (so does CUDA).

    Checked in a fresh script, the caller a zygote is meant for.
    """
    env = {k: v for k, v in os.environ.items() if k != "NBBATCH_ZYGOTE"}
    done = subprocess.run([sys.executable, "-c", UNSAFE_SCRIPT], capture_output=True, text=True, timeout=150,
                          env=env, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
