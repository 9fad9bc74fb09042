"""Plain `python script.py` with classes defined in `__main__`, as Determined scripts are written."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.timeout(180)

BODY = """
import torch
from nbbatch import TorchBatchProcessor, torch_batch_process

print("top-level code ran", flush=True)


class Square(TorchBatchProcessor):
    def __init__(self, context):
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")

    def process_batch(self, batch, batch_idx):
        self.total.update(int(batch.sum()))
        return {"square": batch * batch}

"""

RUN = """
run = torch_batch_process(Square, list(range(100)), batch_size=8, num_processes=2, progress=False)
print(run.status, run.reduced_metrics["total"], run.counts["rows"], flush=True)
"""


@pytest.mark.parametrize("guarded", [False, True], ids=["no-main-guard", "main-guard"])
def test_script_with_classes_in_main(tmp_path: pathlib.Path, guarded: bool) -> None:
    run = RUN if not guarded else 'if __name__ == "__main__":\n' + textwrap.indent(RUN, "    ")
    (tmp_path / "job.py").write_text(BODY + run)
    done = subprocess.run([sys.executable, "job.py"], cwd=tmp_path, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines.count("top-level code ran") == 1, "workers must not re-run the user's script"
    assert lines[-1] == f"done {sum(range(100))} 100"
