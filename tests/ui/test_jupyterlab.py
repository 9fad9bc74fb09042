"""The notebook's stop button in a real JupyterLab, driven by headless Chromium.

A JupyterLab server (127.0.0.1, a random token, a temporary root holding one notebook) runs a
`%batchprocess` cell with a slow processor and 2 workers. The test watches the live ipywidgets
display render in JupyterLab itself and move, presses the notebook toolbar's interrupt button,
and checks that the display ends showing `preempted`, that the store says so, and that running
the cell again completes the run with every sample stored exactly once.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from typing import Any

import nbformat
import pytest

import helpers
import nbbatch

pytestmark = [pytest.mark.ui, pytest.mark.slow, pytest.mark.timeout(300)]

KERNEL = "nbbatch-lab"
N, BATCH = 240, 2  # 120 batches of 0.15 s over 2 workers: ~9 s of work
SETUP = """\
import time
from nbbatch import TorchBatchProcessor

class Slow(TorchBatchProcessor):
    def __init__(self, context):
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")

    def process_batch(self, batch, batch_idx):
        time.sleep(0.15)
        self.total.update(int(batch.sum()))
        return {"value": batch * 2}

data = list(range(%d))
%%load_ext nbbatch
""" % N
LINE = f"%batchprocess Slow data --batch-size {BATCH} --processes 2 --checkpoint-interval 2 --name lab"


def _write_notebook(root: pathlib.Path) -> None:
    book = nbformat.v4.new_notebook()
    book.metadata["kernelspec"] = {"name": KERNEL, "display_name": "nbbatch lab", "language": "python"}
    book.cells = [nbformat.v4.new_code_cell(SETUP), nbformat.v4.new_code_cell(LINE)]
    nbformat.write(book, root / "run.ipynb")


def _jupyter_dirs(base: pathlib.Path) -> dict[str, str]:
    """A kernelspec running this interpreter, and config, runtime and settings dirs of our own."""
    spec = base / "path" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nbbatch lab", "language": "python", "env": {"NBBATCH_STORE": ""},
    }))
    settings = base / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    # No "get notified about news?" toast over the notebook.
    settings.joinpath("notification.jupyterlab-settings").write_text(json.dumps({"fetchNews": "false"}))
    return {"JUPYTER_PATH": str(base / "path"), "JUPYTER_CONFIG_DIR": str(base / "config"),
            "JUPYTER_RUNTIME_DIR": str(base / "runtime"), "settings": str(base / "settings"),
            "workspaces": str(base / "workspaces")}


@pytest.fixture
def lab(tmp_path: pathlib.Path) -> Iterator[tuple[str, pathlib.Path]]:
    """A JupyterLab server on 127.0.0.1 with a random token; yields (notebook URL, root dir)."""
    root = tmp_path / "root"
    root.mkdir()
    _write_notebook(root)
    dirs = _jupyter_dirs(tmp_path / "jupyter")
    token, port, tag = secrets.token_hex(16), helpers.free_port(), helpers.new_tag()
    env = {**os.environ, "JUPYTER_PATH": dirs["JUPYTER_PATH"], "JUPYTER_CONFIG_DIR": dirs["JUPYTER_CONFIG_DIR"],
           "JUPYTER_RUNTIME_DIR": dirs["JUPYTER_RUNTIME_DIR"], helpers.TAG: tag, "NBBATCH_STORE": ""}
    args = [sys.executable, "-m", "jupyterlab", "--no-browser", f"--IdentityProvider.token={token}",
            "--ip", "127.0.0.1", "--port", str(port), f"--ServerApp.root_dir={root}",
            f"--LabApp.user_settings_dir={dirs['settings']}", f"--LabApp.workspaces_dir={dirs['workspaces']}"]
    if os.geteuid() == 0:
        args.append("--allow-root")
    log = open(tmp_path / "jupyterlab.log", "wb")
    server = subprocess.Popen(args, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        if server.poll() is not None:
            pytest.fail(f"jupyter lab exited with {server.returncode}: {(tmp_path / 'jupyterlab.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    try:
        helpers.poll(answers, 90, "jupyter lab to answer", every=0.2)
        yield f"{base}/lab/tree/run.ipynb?token={token}", root
    finally:
        server.send_signal(signal.SIGTERM)  # shuts its kernels down
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        helpers.kill_tagged(tag)
        log.close()


def _batches_done(text: str) -> int | None:
    match = re.search(r"(\d+)/(\d+) batches", text)
    return int(match.group(1)) if match else None


def test_stop_button_preempts_and_running_the_cell_again_completes(page: Any, lab: tuple[str, pathlib.Path]) -> None:
    url, root = lab
    store = str(root / "nbbatch.duckdb")
    page.goto(url)
    cells = page.locator(".jp-NotebookPanel .jp-Notebook .jp-Cell")
    cells.nth(1).wait_for(state="visible", timeout=120_000)
    status_bar = page.locator(".jp-StatusBar-TextItem", has_text="nbbatch lab")
    helpers.poll(lambda: "Idle" in status_bar.first.inner_text(), 120, "the kernel to be idle")

    cells.nth(0).locator(".jp-InputPrompt").click()  # select the first cell (command mode)
    page.keyboard.press("Shift+Enter")  # run the setup, select the %batchprocess cell
    page.keyboard.press("Shift+Enter")  # run it
    output = cells.nth(1).locator(".jp-OutputArea")

    # The live display renders in JupyterLab and moves; remember every title it showed.
    titles: set[str] = set()

    def progress() -> int | None:
        if output.locator(".widget-html-content").count() == 0:
            return None
        for text in output.locator(".widget-html-content").all_inner_texts():
            if text.startswith("nbbatch"):
                titles.add(text)
        done = _batches_done(output.inner_text())
        return done if done and any(" running" in t for t in titles) else None

    first = helpers.poll(progress, 120, "the live widget to show progress", every=0.1)
    moved = helpers.poll(lambda: (p := progress()) is not None and p > first and p, 60, "the progress to move",
                         every=0.1)
    assert 0 < first < moved < N // BATCH

    page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:interrupt-kernel"]').first.click()
    summary = output.locator(".nbbatch-summary")
    summary.wait_for(state="visible", timeout=90_000)
    helpers.poll(lambda: "KeyboardInterrupt" in output.inner_text(), 60, "the cell to end with KeyboardInterrupt")
    assert "preempted" in summary.inner_text(), summary.inner_text()
    assert output.locator(".widget-html-content").count() == 0, "the live widgets gave way to the static summary"
    run = nbbatch.open_run("lab", store=store)
    assert run.status == "preempted"
    committed = run.counts["committed_batches"]
    assert 0 < committed < N // BATCH, committed

    # Running the same cell again resumes the run: only the missing batches, every sample once.
    cells.nth(1).locator(".jp-InputPrompt").click()
    page.keyboard.press("Control+Enter")
    helpers.poll(lambda: "done" in (output.locator(".nbbatch-summary").all_inner_texts() or [""])[0], 120,
                 "the re-run cell to show `done`", every=0.2)
    assert "KeyboardInterrupt" not in output.inner_text()
    run = nbbatch.open_run("lab", store=store)
    assert run.status == "done" and run.summary["attempt"] == 2
    assert run.sql("SELECT count(*), count(DISTINCT sample_index), min(sample_index), max(sample_index), "
                   "count(*) FILTER (WHERE value = 2 * sample_index) FROM outputs").fetchall() == [(N, N, 0, N - 1, N)]
    assert run.reduced_metrics == {"total": sum(range(N))}

    # While the first run started, the display said what it waited for (not only "starting…").
    assert any(re.search(r"starting 2 workers", t) for t in titles), sorted(titles)
