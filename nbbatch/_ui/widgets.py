"""The live ipywidgets display of a run in Jupyter, and the static summary it leaves behind.

The launcher calls `update` from its own loop about twice a second, so the display stays live
while the cell blocks (a Panel or asyncio callback would not tick then). When the run ends the
widgets are replaced by plain HTML, which a saved notebook still shows. Reads only
``nbbatch._progress``.
"""

from __future__ import annotations

import html
import time
from typing import Any

from nbbatch._progress import ProgressSnapshot, Reporter, format_duration, terminal_reporter

__all__ = ["WidgetReporter", "summary_html", "widget_reporter"]

_COLORS = {"done": "#2e7d32", "failed": "#c62828", "preempted": "#ef6c00", "running": "#1565c0"}


def _rate(s: ProgressSnapshot) -> str:
    return f"{s.rate:,.1f} samples/s" if s.rate else "… samples/s"


def _metrics_html(metrics: dict[str, Any]) -> str:
    if not metrics:
        return ""
    cells = "".join(
        f"<tr><td style='padding:0 8px'>{html.escape(str(k))}</td><td>{html.escape(_short(v))}</td></tr>"
        for k, v in list(metrics.items())[:12]
    )
    return f"<table style='font-size:90%'>{cells}</table>"


def _short(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) < 80 else text[:77] + "…"


def _errors_html(errors: tuple[str, ...]) -> str:
    if not errors:
        return ""
    items = "".join(f"<li><code>{html.escape(e)}</code></li>" for e in errors[-5:])
    return f"<div style='color:#c62828'><b>errors</b><ul style='margin:2px 0'>{items}</ul></div>"


def summary_html(s: ProgressSnapshot, error: str | None = None) -> str:
    """A self-contained HTML summary of a run (what a saved notebook keeps)."""
    color = _COLORS.get(s.status, "#555")
    pct = 100 * s.fraction
    tail = ""
    if error:
        tail = f"<pre style='color:#c62828;white-space:pre-wrap;max-height:240px;overflow:auto'>{html.escape(error)}</pre>"
    return (
        "<div style='font-family:sans-serif;border:1px solid #ddd;border-radius:6px;padding:8px;max-width:760px'>"
        f"<div><b>nbbatch</b> run <code>{html.escape(s.run_name)}</code> "
        f"<span style='color:{color};font-weight:bold'>{html.escape(s.status)}</span></div>"
        f"<div style='background:#eee;border-radius:4px;height:14px;margin:6px 0'>"
        f"<div style='background:{color};width:{pct:.1f}%;height:14px;border-radius:4px'></div></div>"
        f"<div>{s.done_batches}/{s.total_batches} batches ({pct:.0f}%) · {s.committed_batches} committed · "
        f"{s.failed_batches} failed · {s.rows:,} samples · {_rate(s)} · {format_duration(s.elapsed)} elapsed</div>"
        f"{_metrics_html(s.metrics)}{_errors_html(s.errors)}{tail}</div>"
    )


class WidgetReporter:
    """Overall bar with rate and ETA, one bar per worker, counts, latest metrics and errors."""

    min_interval = 0.5

    def __init__(self) -> None:
        import ipywidgets as w
        from IPython.display import display

        self._w = w
        self.title = w.HTML()
        self.bar = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="420px"))
        self.label = w.HTML()
        self.workers = w.VBox()
        self.metrics = w.HTML()
        self.errors = w.HTML()
        self.box = w.VBox([self.title, w.HBox([self.bar, self.label]), self.workers, self.metrics, self.errors])
        self.handle = display(self.box, display_id=True)
        self._worker_bars: list[Any] = []
        self._last = 0.0

    def update(self, snapshot: ProgressSnapshot) -> None:
        now = time.monotonic()
        if now - self._last < self.min_interval and snapshot.status == "running":
            return
        self._last = now
        self._render(snapshot)

    def _render(self, s: ProgressSnapshot) -> None:
        w = self._w
        color = _COLORS.get(s.status, "#555")
        self.title.value = (
            f"<b>nbbatch</b> run <code>{html.escape(s.run_name)}</code> "
            f"<span style='color:{color}'>{html.escape(s.status)}</span>"
        )
        self.bar.value = s.fraction
        self.bar.bar_style = {"done": "success", "failed": "danger", "preempted": "warning"}.get(s.status, "")
        self.label.value = (
            f"&nbsp;{s.done_batches}/{s.total_batches} batches · {_rate(s)} · ETA {format_duration(s.eta)} · "
            f"{s.committed_batches} committed · {s.failed_batches} failed"
        )
        while len(self._worker_bars) < len(s.workers):
            bar = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="200px", height="12px"))
            label = w.HTML()
            self._worker_bars.append((bar, label))
            self.workers.children = [w.HBox([b, lbl]) for b, lbl in self._worker_bars]
        for (bar, label), worker in zip(self._worker_bars, s.workers):
            bar.value = 1.0 if worker.total == 0 else min(1.0, worker.done / worker.total)
            label.value = f"&nbsp;rank {worker.rank}: {worker.done}/{worker.total} {html.escape(worker.status)}"
        self.metrics.value = _metrics_html(s.metrics)
        self.errors.value = _errors_html(s.errors)

    def close(self, snapshot: ProgressSnapshot, error: str | None = None) -> None:
        from IPython.display import HTML

        self._render(snapshot)
        if self.handle is not None:
            self.handle.update(HTML(summary_html(snapshot, error)))
        self.box.close()


def widget_reporter() -> Reporter:
    """The ipywidgets display when a Jupyter frontend is attached, else a terminal reporter."""
    try:
        import ipywidgets  # noqa: F401
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover - both are dependencies
        return terminal_reporter()
    if shell is None or type(shell).__name__ != "ZMQInteractiveShell":
        return terminal_reporter()
    return WidgetReporter()
