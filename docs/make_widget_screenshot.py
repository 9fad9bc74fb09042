"""Render the notebook progress display of a real run and screenshot it in headless Chromium.

ipywidgets need their JavaScript from a CDN to render outside Jupyter, and this machine has no
internet, so the page shows what the display leaves in a notebook: the same HTML summary, taken
once mid-run (status ``running``) and once at the end.

    .venv/bin/python docs/make_widget_screenshot.py      # writes docs/notebook-widget.png
"""

from __future__ import annotations

import pathlib
import sys
import tempfile
import time

import torch

from nbbatch import TorchBatchProcessor, torch_batch_process
from nbbatch._progress import ProgressSnapshot
from nbbatch._ui.widgets import summary_html

HERE = pathlib.Path(__file__).resolve().parent


class Classify(TorchBatchProcessor):
    def __init__(self, context):
        self.context = context
        self.model = context.prepare_model_for_inference(torch.nn.Linear(8, 4))

    def process_batch(self, batch, batch_idx):
        time.sleep(0.05)
        with torch.no_grad():
            logits = self.model(torch.randn(len(batch), 8))
        if batch_idx == 3 and self.context.get_distributed_rank() == 1:
            raise ValueError("corrupt record 1240")
        self.context.report_metrics("inference", batch_idx, {"mean_logit": float(logits.mean())})
        return {"prediction": logits.argmax(1)}


class Capture:
    """A Reporter keeping the snapshot shown mid-run and the final one."""

    def __init__(self) -> None:
        self.middle: ProgressSnapshot | None = None
        self.final: ProgressSnapshot | None = None

    def update(self, snapshot: ProgressSnapshot) -> None:
        if snapshot.rate and (self.middle is None or snapshot.fraction < 0.7):
            self.middle = snapshot

    def close(self, snapshot: ProgressSnapshot) -> None:
        self.final = snapshot


def main() -> None:
    from playwright.sync_api import sync_playwright

    capture = Capture()
    with tempfile.TemporaryDirectory() as tmp:
        torch_batch_process(Classify, list(range(2000)), batch_size=40, num_processes=2, checkpoint_interval=2,
                            store=f"{tmp}/s.duckdb", run_name="screenshot", on_error="skip", progress=capture)
    assert capture.middle is not None and capture.final is not None
    page_html = (
        "<html><body style='margin:16px'><h3 style='font-family:sans-serif'>%batchprocess Classify data "
        "--processes 2 --on-error skip</h3>" + summary_html(capture.middle) + "<br>" + summary_html(capture.final)
        + "</body></html>"
    )
    out = HERE / "notebook-widget.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium",
                                    args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        page = browser.new_page(viewport={"width": 820, "height": 420})
        page.set_content(page_html)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
