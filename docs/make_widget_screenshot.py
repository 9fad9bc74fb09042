"""Screenshot nbbatch's notebook progress display, from a notebook executed by nbclient, in Chromium.

It builds a small notebook (a processor with one failing batch, ``--on-error skip``), executes it
with nbclient on a real kernel: first a blocking ``%batchprocess`` (which leaves its static
summary), then a ``--background`` run and a last cell that waits until that run is about half way
and has recorded its error. nbclient saves the widgets' state as it was then: the live display.
nbconvert is not a dependency, so the notebook's code cells, their HTML outputs and the saved
widget state are written to a page by hand and drawn by Jupyter's own widget renderer (the npm
package ``@jupyter-widgets/html-manager``, fetched once with ``npm pack`` into
``~/.cache/nbbatch-docs``), as JupyterLab would. Playwright takes the screenshot.

    .venv/bin/python docs/make_widget_screenshot.py      # writes docs/notebook-widget.png

Needs ``npm`` (once), ``playwright`` and ``/usr/bin/chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import html
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from typing import Any

import nbformat
from nbclient import NotebookClient

HERE = pathlib.Path(__file__).resolve().parent
CACHE = pathlib.Path.home() / ".cache" / "nbbatch-docs"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

SETUP = '''import time
import torch
from nbbatch import TorchBatchProcessor


class Classify(TorchBatchProcessor):
    def __init__(self, context):
        self.context = context
        self.model = context.prepare_model_for_inference(torch.nn.Linear(8, 4))

    def process_batch(self, batch, batch_idx):
        time.sleep(0.2)
        with torch.no_grad():
            logits = self.model(torch.randn(len(batch), 8))
        if batch_idx == 3 and self.context.get_distributed_rank() == 1:
            raise ValueError(f"corrupt record {int(batch[0])}")
        self.context.report_metrics("inference", batch_idx, {"mean_logit": float(logits.mean()),
                                                             "max_prob": float(logits.softmax(1).max())})
        return {"prediction": logits.argmax(1)}


data = list(range(4000))'''
OPTIONS = "--batch-size 40 --processes 2 --checkpoint-interval 2 --on-error skip"
BLOCKING = f"%batchprocess Classify data {OPTIONS} --name nightly --store finished.duckdb"
BACKGROUND = f"%batchprocess Classify data {OPTIONS} --name screenshot --background --out live"
WAIT = '''deadline = time.monotonic() + 120
while time.monotonic() < deadline and (live.counts["done_batches"] < 40 or not live.counts["errors"]):
    time.sleep(0.2)
time.sleep(0.6)  # one more display update'''


def execute(cwd: pathlib.Path) -> nbformat.NotebookNode:
    """The notebook, executed by nbclient in ``cwd`` with this interpreter as the kernel."""
    kernels = cwd / "jupyter" / "kernels" / "nbbatch-docs"
    kernels.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (kernels / "kernel.json").write_text(json.dumps({"argv": argv, "display_name": "nbbatch", "language": "python"}))
    os.environ["JUPYTER_PATH"] = str(cwd / "jupyter")
    cells = ["%load_ext nbbatch", SETUP, BLOCKING, BACKGROUND, WAIT]
    book = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(book, timeout=300, kernel_name="nbbatch-docs", resources={"metadata": {"path": str(cwd)}})
    client.execute()
    return book


def html_manager() -> pathlib.Path:
    """The ``dist`` folder of ``@jupyter-widgets/html-manager`` matching the installed ipywidgets."""
    from ipywidgets.embed import __html_manager_version__

    dist = CACHE / "package" / "dist"
    if not (dist / "embed.js").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        spec = "@jupyter-widgets/html-manager@" + __html_manager_version__  # a semver range, e.g. ^1.0.1
        out = subprocess.run(["npm", "pack", spec, "--silent"], cwd=CACHE, check=True, capture_output=True, text=True)
        with tarfile.open(CACHE / out.stdout.strip().splitlines()[-1]) as tar:
            tar.extractall(CACHE, filter="data")
    return dist


def script_json(value: Any) -> str:
    """JSON inside a ``<script>`` element: raw (not HTML-escaped), with no ``</`` to end it early."""
    return json.dumps(value).replace("</", "<\\/")


def render_output(output: dict[str, Any]) -> str:
    """One output as the notebook shows it: a widget view, HTML, or text."""
    data = output.get("data", {})
    if WIDGET_VIEW in data:
        return f"<script type='{WIDGET_VIEW}'>{script_json(data[WIDGET_VIEW])}</script>"
    if "text/html" in data:
        return str(data["text/html"])
    text = output.get("text") or data.get("text/plain", "")
    return f"<pre style='margin:2px 0'>{html.escape(str(text))}</pre>" if text else ""


def page(book: nbformat.NotebookNode, shown: dict[str, str]) -> str:
    """The cells named in ``shown`` (source -> caption), with their outputs and the widget state."""
    state = book.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]
    code = "font-family:monospace;background:#f5f5f5;border:1px solid #e0e0e0;padding:6px 8px;margin-bottom:6px"
    parts = []
    for source, caption in shown.items():
        cell = next(c for c in book.cells if c.source == source)
        outputs = "".join(render_output(o) for o in cell.outputs)
        live = " id='live'" if "--background" in cell.source else ""
        parts.append(
            f"<div style='color:#888;font-size:12px;margin-top:14px'>[{cell.execution_count}] "
            f"{html.escape(caption)}</div><div style='{code}'>{html.escape(cell.source)}</div>"
            f"<div{live}>{outputs}</div>"
        )
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>nbbatch widget</title>"
        "<script src='html-manager/embed.js'></script>"
        f"<script type='application/vnd.jupyter.widget-state+json'>{script_json(state)}</script></head>"
        f"<body style='margin:16px;font-family:sans-serif;width:900px'>{''.join(parts)}</body></html>"
    )


def main() -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        book = execute(pathlib.Path(tmp))
    site = CACHE / "page"  # kept, to open by hand: file://~/.cache/nbbatch-docs/page/index.html
    shutil.rmtree(site, ignore_errors=True)
    shutil.copytree(html_manager(), site / "html-manager")
    index = site / "index.html"
    index.write_text(page(book, {
        BACKGROUND: "a background run, live while the notebook goes on (interrupted here half way)",
        BLOCKING: "a blocking run after it ended: the static summary a saved notebook keeps",
    }), encoding="utf-8")
    out = HERE / "notebook-widget.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        view = browser.new_page(viewport={"width": 940, "height": 600})
        view.goto(index.as_uri())
        view.wait_for_selector("#live .widget-hprogress .progress-bar", timeout=30_000)  # drawn by the widget JS
        view.click("#live details summary")  # open the remote traceback
        view.wait_for_timeout(500)
        bars = view.locator("#live .widget-hprogress").count()
        view.screenshot(path=str(out), full_page=True)
        browser.close()
    if bars < 3:
        raise SystemExit(f"expected the overall bar and one per worker, got {bars} progress widgets")
    print(f"wrote {out}: {bars} progress widgets rendered", file=sys.stderr)


if __name__ == "__main__":
    main()
