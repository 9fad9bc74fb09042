"""Screenshot the notebook's live progress display (real ipywidgets) in headless Chromium.

It runs a real 2-worker run with a failing batch (``on_error="skip"``), keeps the progress
snapshot the launcher reported mid-run, renders nbbatch's `WidgetReporter` from it, and embeds
those widgets in a page (``ipywidgets.embed``). Jupyter's widget renderer (the npm package
``@jupyter-widgets/html-manager``, fetched once with ``npm pack`` into ``~/.cache/nbbatch-docs``)
draws them in Chromium as JupyterLab would; below it, the static summary the display leaves in
a saved notebook when the run ends.

    .venv/bin/python docs/make_widget_screenshot.py      # writes docs/notebook-widget.png

Needs ``npm`` (once), ``playwright`` and ``/usr/bin/chromium`` (``apt-get install -y chromium``).
"""

from __future__ import annotations

import html
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time

import torch

from nbbatch import TorchBatchProcessor, torch_batch_process
from nbbatch._progress import ProgressSnapshot
from nbbatch._ui.widgets import WidgetReporter, store_tracebacks, summary_html

HERE = pathlib.Path(__file__).resolve().parent
CACHE = pathlib.Path.home() / ".cache" / "nbbatch-docs"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
LINE = "%batchprocess Classify data --batch-size 40 --processes 2 --checkpoint-interval 2 --on-error skip --name screenshot"


class Classify(TorchBatchProcessor):
    def __init__(self, context):
        self.context = context
        self.model = context.prepare_model_for_inference(torch.nn.Linear(8, 4))

    def process_batch(self, batch, batch_idx):
        time.sleep(0.06)
        with torch.no_grad():
            logits = self.model(torch.randn(len(batch), 8))
        if batch_idx == 3 and self.context.get_distributed_rank() == 1:
            raise ValueError(f"corrupt record {int(batch[0])}")
        self.context.report_metrics("inference", batch_idx, {"mean_logit": float(logits.mean()),
                                                             "max_prob": float(logits.softmax(1).max())})
        return {"prediction": logits.argmax(1)}


class Capture:
    """A Reporter keeping one snapshot from about 60% through, and the final one."""

    def __init__(self) -> None:
        self.middle: ProgressSnapshot | None = None
        self.final: ProgressSnapshot | None = None

    def update(self, snapshot: ProgressSnapshot) -> None:
        if snapshot.rate and snapshot.errors and (self.middle is None or snapshot.fraction < 0.65):
            self.middle = snapshot

    def close(self, snapshot: ProgressSnapshot) -> None:
        self.final = snapshot


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


def page(snippet: str, final_html: str) -> str:
    code = "font-family:monospace;background:#f5f5f5;border:1px solid #e0e0e0;padding:6px 8px;margin-bottom:6px"
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>nbbatch widget</title></head>"
        "<body style='margin:16px;font-family:sans-serif;width:900px'>"
        f"<div style='color:#888;font-size:12px'>[3] live, while the cell runs</div><div style='{code}'>{html.escape(LINE)}</div>"
        f"<div id='live'>{snippet}</div>"
        f"<div style='color:#888;font-size:12px;margin-top:18px'>[3] after the run (what a saved notebook keeps)</div>"
        f"<div style='{code}'>{html.escape(LINE)}</div>{final_html}</body></html>"
    )


def main() -> None:
    from ipywidgets.embed import embed_snippet
    from playwright.sync_api import sync_playwright

    capture = Capture()
    with tempfile.TemporaryDirectory() as tmp:
        store = f"{tmp}/nbbatch.duckdb"
        torch_batch_process(Classify, list(range(4000)), batch_size=40, num_processes=2, checkpoint_interval=2,
                            store=store, run_name="screenshot", on_error="skip", progress=capture)
        assert capture.middle is not None and capture.final is not None, "no mid-run snapshot was reported"
        live = WidgetReporter(tracebacks=store_tracebacks(store), display=lambda obj, display_id: None)
        live._render(capture.middle)
        final_html = summary_html(capture.final, live.tracebacks)
        site = CACHE / "page"  # kept, to open by hand: file://~/.cache/nbbatch-docs/page/index.html
        shutil.rmtree(site, ignore_errors=True)
        shutil.copytree(html_manager(), site / "html-manager")
        snippet = embed_snippet([live.box], requirejs=False, embed_url="html-manager/embed.js", cors=False)
        index = site / "index.html"
        index.write_text(page(snippet, final_html), encoding="utf-8")
        out = HERE / "notebook-widget.png"
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            view = browser.new_page(viewport={"width": 940, "height": 600})
            view.goto(index.as_uri())
            view.wait_for_selector("#live .widget-hprogress .progress-bar", timeout=30_000)  # rendered by the widget JS
            view.click("#live details summary")  # open the remote traceback
            view.wait_for_timeout(500)
            rendered = view.locator("#live .widget-hprogress").count()
            view.screenshot(path=str(out), full_page=True)
            browser.close()
    print(f"wrote {out}: {rendered} progress widgets rendered", file=sys.stderr)


if __name__ == "__main__":
    main()
