"""The magics in a real IPython shell: processors defined through `run_cell` live in `__main__`."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import nbbatch

pytestmark = pytest.mark.timeout(120)

SETUP = """
import torch
from nbbatch import TorchBatchProcessor

class Double(TorchBatchProcessor):
    def __init__(self, context):
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")
    def process_batch(self, batch, batch_idx):
        self.total.update(int(batch.sum()))
        return {"double": batch * 2}

class Broken(TorchBatchProcessor):
    def __init__(self, context):
        pass
    def process_batch(self, batch, batch_idx):
        raise KeyError("missing feature")

data = list(range(40))
"""


@pytest.fixture
def shell(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    monkeypatch.chdir(tmp_path)
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbbatch")
    assert sh.run_cell(SETUP).success
    yield sh
    sh.run_line_magic("unload_ext", "nbbatch")
    InteractiveShell.clear_instance()


def test_line_magic_runs_and_leaves_the_run(shell: InteractiveShell, tmp_path: pathlib.Path) -> None:
    run = shell.run_line_magic("batchprocess", "Double data --batch-size 8 --processes 2 --name first --no-progress")
    assert isinstance(run, nbbatch.Run)
    assert shell.user_ns["_run"].id == run.id
    assert run.status == "done" and run.reduced_metrics == {"total": sum(range(40))}
    rows = run.outputs().fetchall()
    assert [r[4] for r in rows] == list(range(40)) and [r[5] for r in rows] == [2 * i for i in range(40)]
    assert (tmp_path / "nbbatch.duckdb").exists()


def test_out_and_store_options(shell: InteractiveShell, tmp_path: pathlib.Path) -> None:
    store = tmp_path / "other.duckdb"
    shell.run_line_magic("batchprocess", f"Double data --store {store} --out result --no-progress")
    assert shell.user_ns["result"].store == str(store)
    assert shell.user_ns["result"].counts["rows"] == 40


def test_cell_magic_runs_the_class_the_cell_defines(shell: InteractiveShell) -> None:
    cell = (
        "class Plus(TorchBatchProcessor):\n"
        "    def __init__(self, context):\n        pass\n"
        "    def process_batch(self, batch, batch_idx):\n        return batch + 1\n"
    )
    run = shell.run_cell_magic("batchprocess", "--dataset data --batch-size 16 --no-progress", cell)
    assert [r[5] for r in run.outputs().fetchall()] == [i + 1 for i in range(40)]
    assert "Plus" in shell.user_ns


@pytest.mark.parametrize(
    "line,text",
    [
        ("Missing data", "no processor class named 'Missing'"),
        ("Double nothing", "no dataset named 'nothing'"),
        ("Double", "usage: %batchprocess Processor dataset"),
        ("Double data --batch-size many", "invalid int value"),
        ("data data", "is not a class"),
    ],
)
def test_bad_usage_is_a_usage_error(shell: InteractiveShell, line: str, text: str) -> None:
    with pytest.raises(UsageError, match=text):
        shell.run_line_magic("batchprocess", line + " --no-progress")


def test_cell_without_processor_is_a_usage_error(shell: InteractiveShell) -> None:
    with pytest.raises(UsageError, match="defines no TorchBatchProcessor"):
        shell.run_cell_magic("batchprocess", "--dataset data", "x = 1\n")


def test_help_text(shell: InteractiveShell) -> None:
    doc = shell.find_line_magic("batchprocess").__doc__
    assert "--batch-size" in doc and "--background" in doc and "Interrupt the kernel" in doc


def test_worker_failure_propagates_with_the_run_left_behind(shell: InteractiveShell) -> None:
    with pytest.raises(nbbatch.WorkerFailed) as info:
        shell.run_line_magic("batchprocess", "Broken data --name broken --no-progress")
    assert "KeyError" in info.value.remote_traceback
    assert shell.user_ns["_run"].status == "failed"


def test_background_returns_at_once_and_wait_joins(shell: InteractiveShell) -> None:
    run = shell.run_line_magic("batchprocess", "Double data --batch-size 4 --background --no-progress")
    assert run.wait(timeout=100).status == "done"
    assert run.counts["rows"] == 40
    bad = shell.run_line_magic("batchprocess", "Broken data --background --no-progress")
    with pytest.raises(nbbatch.WorkerFailed):
        bad.wait(timeout=100)


def test_second_live_run_on_the_same_store_is_refused(shell: InteractiveShell) -> None:
    shell.run_cell("import time\nclass Slow(Double):\n    def process_batch(self, batch, batch_idx):\n        time.sleep(0.2)\n        return super().process_batch(batch, batch_idx)\n")
    run = shell.run_line_magic("batchprocess", "Slow data --batch-size 2 --background --no-progress")
    with pytest.raises(nbbatch.StoreBusy, match="in use by a live run"):
        shell.run_line_magic("batchprocess", "Double data --no-progress")
    run.stop()
    assert run.wait(timeout=100).status == "preempted"


def test_repr_html_shows_status_and_outputs(shell: InteractiveShell) -> None:
    run = shell.run_line_magic("batchprocess", "Double data --no-progress")
    page = run._repr_html_()
    assert "done" in page and "first outputs" in page and "double" in page
