"""`torch_batch_process` called in a real Jupyter kernel (nbclient), without the magic: its live
display reads the store, so the summary it leaves shows the worker's own traceback, as the
magic's display does."""

from __future__ import annotations

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = [pytest.mark.timeout(240), pytest.mark.slow]

SETUP = """\
from nbbatch import TorchBatchProcessor, torch_batch_process

class SkipsSeven(TorchBatchProcessor):
    def __init__(self, context):
        pass

    def process_batch(self, batch, batch_idx):
        if 7 in batch.tolist():
            raise ValueError("sample seven is unreadable")
        return {"value": batch}
"""

RUN = """\
run = torch_batch_process(SkipsSeven, list(range(20)), batch_size=2, num_processes=2, on_error="skip",
                          store="plain.duckdb", run_name="plain")
"""


def html_of(cell: nbformat.NotebookNode) -> str:
    return "\n".join(str(o.get("data", {}).get("text/html", "")) for o in cell.get("outputs", []))


def test_plain_call_shows_worker_tracebacks_from_the_store(tmp_path: pathlib.Path, kernel_name: str) -> None:
    book = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(SETUP),
        nbformat.v4.new_code_cell(RUN),
        nbformat.v4.new_code_cell("print(run.status, run.counts['failed_batches'], run.fraction_done)"),
    ])
    NotebookClient(book, timeout=180, kernel_name=kernel_name, resources={"metadata": {"path": str(tmp_path)}}).execute()
    printed = "".join(o.get("text", "") for o in book.cells[2].outputs)
    assert printed.split() == ["done", "1", "1.0"], printed
    shown = html_of(book.cells[1])
    assert "nbbatch-summary" in shown and "<code>plain</code>" in shown, shown
    assert "10/10 batches (100%)" in shown, "the skipped batch counts as processed, as in the dashboard"
    # The remote traceback, read from the store's errors table: where it was raised, and why.
    assert "<details><summary>rank 1, batch_idx 1 (samples 6–7): ValueError: sample seven is unreadable" in shown, shown
    assert "Traceback (most recent call last)" in shown and "line 9, in process_batch" in shown, shown
