"""In a Jupyter kernel workers come from the forkserver, never from a fork of the kernel.

A kernel has zmq threads and sockets, and forking it would keep the pages of the session's data
alive in the fork after the notebook drops them (`nbbatch._launch.zygote`). The forkserver stays
warm for the next cell instead.
"""

from __future__ import annotations

import json
import os
import pathlib
import sys
from typing import Any

import pytest
from helpers import run_cell, stream_text

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

CELL = """
import json, os, torch, nbbatch
from nbbatch._launch import forkserver

class Where(nbbatch.TorchBatchProcessor):
    def __init__(self, context):
        pass
    def process_batch(self, batch, batch_idx):
        parent = os.getppid()
        self_name = open("/proc/self/comm").read().strip()
        with open(os.path.join(OUT, "worker.json"), "w") as f:
            json.dump({"parent": parent, "cmdline": open(f"/proc/{parent}/cmdline", "rb").read().decode(errors="replace"),
                       "name": self_name}, f)
        return {"y": batch}

run = nbbatch.torch_batch_process(Where, torch.arange(4.0), batch_size=4, num_processes=1,
                                  store=os.path.join(OUT, "s.duckdb"), progress=False)
print(json.dumps({"status": run.status, "server": forkserver.server_kind(), "kernel": os.getpid()}))
"""


def _run_cell(client: Any, code: str, timeout: float = 150) -> str:
    """What the cell printed; it must raise nothing."""
    messages = run_cell(client, code, timeout)
    errors = ["\n".join(m["content"]["traceback"]) for m in messages if m["msg_type"] == "error"]
    assert not errors, errors
    return stream_text(messages)


def test_a_kernels_workers_come_from_the_forkserver(tmp_path: pathlib.Path) -> None:
    from jupyter_client.manager import start_new_kernel

    env = {**os.environ, "NBBATCH_STORE": ""}
    env.pop("NBBATCH_ZYGOTE", None)
    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path), env=env)
    try:
        kc.execute_interactive(f"import sys; assert sys.executable == {sys.executable!r}", timeout=60)
        out = _run_cell(kc, f"OUT = {str(tmp_path)!r}\n" + CELL)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    result = json.loads(out.strip().splitlines()[-1])
    worker = json.loads((tmp_path / "worker.json").read_text())
    assert result["status"] == "done" and result["server"] == "forkserver", result
    assert "multiprocessing.forkserver" in worker["cmdline"] and worker["parent"] != result["kernel"], worker
    assert worker["name"] == "nbbatch-worker"
