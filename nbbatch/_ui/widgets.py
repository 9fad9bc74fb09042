"""The live ipywidgets display of a run in Jupyter, and the static HTML it leaves behind.

The launcher calls `WidgetReporter.update` from its own loop about twice a second, so the display
stays live while the cell blocks (a Panel or asyncio periodic callback would not tick then). When
the run ends the widgets are replaced, in the same output, by plain HTML that a saved notebook
still shows. Remote tracebacks come from the store's ``errors`` table, for the magic's runs and for
a plain `torch_batch_process` call in a kernel alike. Colours, the fraction done and the Jupyter
check come from ``_progress``, as in the dashboard. Reads ``_events``, ``_progress`` and
``_store.reader`` only; must not import the launcher or torch.
"""

from __future__ import annotations

import html
import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from nbbatch._events import Status
from nbbatch._progress import (
    Clock,
    ProgressSnapshot,
    Reporter,
    WorkerProgress,
    format_duration,
    in_jupyter,
    status_color,
    terminal_reporter,
)

__all__ = ["UPDATE_EVERY_SECONDS", "WidgetReporter", "summary_html", "widget_reporter"]

logger = logging.getLogger("nbbatch")

#: Least seconds between two renders of the live display (the launcher updates it more often).
UPDATE_EVERY_SECONDS = 0.5
_MAX_TRACEBACKS = 5
#: Latest metrics shown, and the characters of each value before it is cut with "…".
_MAX_METRICS = 12
_METRIC_CHARS = 80

ErrorRow = tuple[str, str]  # (one-line headline, traceback text)


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _short(value: Any) -> str:
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if len(text) < _METRIC_CHARS else text[:_METRIC_CHARS - 3] + "…"


def _rate(s: ProgressSnapshot) -> str:
    return f"{s.rate:,.1f} samples/s" if s.rate else "… samples/s"


def counts_text(s: ProgressSnapshot) -> str:
    """The one-line numbers under the overall bar (plain text, escape before use in HTML)."""
    eta = f" · ETA {format_duration(s.eta)}" if s.status is Status.RUNNING else ""
    return (
        f"{s.processed_batches}/{s.total_batches} batches ({100 * s.fraction:.0f}%) · {_rate(s)}{eta} · "
        f"{format_duration(s.elapsed)} elapsed · {s.committed_batches} committed · {s.failed_batches} failed"
    )


def metrics_html(metrics: dict[str, Any]) -> str:
    """The latest reported metrics as a small table."""
    if not metrics:
        return ""
    cells = "".join(
        f"<tr><td style='padding:0 12px 0 0'>{_esc(k)}</td><td><code>{_esc(_short(v))}</code></td></tr>"
        for k, v in list(metrics.items())[:_MAX_METRICS]
    )
    return f"<div style='margin-top:4px;line-height:1.3'><b>latest metrics</b><table style='font-size:90%'>{cells}</table></div>"


def errors_html(lines: tuple[str, ...], tracebacks: list[ErrorRow], failure: str | None = None) -> str:
    """Errors: with their remote traceback when the store has it, else the one-line text."""
    if not lines and not tracebacks and not failure:
        return ""
    pre = "style='white-space:pre-wrap;max-height:260px;overflow:auto;margin:2px 0 6px 0;font-size:85%'"
    items = [f"<details><summary>{_esc(head)}</summary><pre {pre}>{_esc(tb)}</pre></details>" for head, tb in tracebacks]
    if len(tracebacks) < len(lines):  # not committed yet, or beyond the ones shown
        items += [f"<div>{_esc(line)}</div>" for line in lines[len(tracebacks) - len(lines):][-_MAX_TRACEBACKS:]]
    if failure and not any(tb.strip() and tb.strip() in failure for _, tb in tracebacks):
        items.append(f"<details open><summary>the run raised</summary><pre {pre}>{_esc(failure)}</pre></details>")
    return f"<div style='color:#b71c1c;margin-top:4px;line-height:1.3'><b>errors</b>{''.join(items)}</div>"


def _worker_line(w: WorkerProgress) -> str:
    failed = f" ({w.failed} failed)" if w.failed else ""
    return f"rank {w.rank}: {w.done + w.failed}/{w.total}{failed} {w.status}"


def summary_html(
    s: ProgressSnapshot, tracebacks: list[ErrorRow] | None = None, failure: str | None = None
) -> str:
    """A self-contained HTML summary of a run: what a saved notebook keeps after the live display.

    Args:
        s: the final snapshot.
        tracebacks: ``(headline, traceback)`` of recorded errors.
        failure: the text of the exception the run raised, if any.

    Example:
        >>> html_text = summary_html(snapshot)   # doctest: +SKIP
    """
    color = status_color(s.status)
    pct = 100 * s.fraction
    workers = "".join(
        f"<div style='font-size:85%'>{_esc(_worker_line(w))}</div>" for w in s.workers
    )
    return (
        "<div class='nbbatch-summary' style='font-family:sans-serif;border:1px solid #ddd;border-radius:6px;"
        "padding:8px;max-width:760px'>"
        f"<div><b>nbbatch</b> run <code>{_esc(s.run_name)}</code> "
        f"<span style='color:{color};font-weight:bold'>{_esc(s.status)}</span></div>"
        "<div style='background:#eee;border-radius:4px;height:14px;margin:6px 0'>"
        f"<div style='background:{color};width:{pct:.1f}%;height:14px;border-radius:4px'></div></div>"
        f"<div>{_esc(counts_text(s))} · {s.rows:,} samples</div>{workers}"
        f"{metrics_html(s.metrics)}{errors_html(s.errors, tracebacks or [], failure)}</div>"
    )


def _failure_text(exc: BaseException) -> str:
    remote = getattr(exc, "remote_traceback", "")
    head = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
    if remote:
        return f"{head}\n\n{remote}"
    return "".join(traceback.format_exception_only(type(exc), exc)).rstrip()


def store_tracebacks(store: str) -> Callable[[str], list[ErrorRow]]:
    """A lookup of the latest recorded errors of a run, with their remote tracebacks."""

    def lookup(run_id: str) -> list[ErrorRow]:
        from nbbatch._store import reader

        with reader.reading(store) as con:
            rows = reader.latest_errors(con, run_id, _MAX_TRACEBACKS, current_attempt=True)
        out = []
        for rank, batch_idx, indices, exc_type, message, tb in reversed(rows):
            where = f"batch_idx {batch_idx}" if batch_idx is not None else "outside a batch"
            span = f" (samples {min(indices)}–{max(indices)})" if indices else ""
            out.append((f"rank {rank}, {where}{span}: {exc_type}: {message}", tb or ""))
        return out

    return lookup


class WidgetReporter:
    """Overall bar with samples/s and ETA, one bar per worker, counts, latest metrics, errors.

    One display, updated in place at most twice a second; `close` swaps it for `summary_html`.

    Args:
        tracebacks: maps a run id to ``(headline, traceback)`` rows (see `store_tracebacks`);
            without it errors show as one line each.
        clock: monotonic seconds, for the update throttle.
        display: IPython's ``display`` (a parameter so tests can capture it).
    """

    min_interval_seconds = UPDATE_EVERY_SECONDS

    def __init__(
        self,
        tracebacks: Callable[[str], list[ErrorRow]] | None = None,
        clock: Clock = time.monotonic,
        display: Callable[..., Any] | None = None,
    ) -> None:
        import ipywidgets as w

        if display is None:
            from IPython.display import display as ipython_display

            display = ipython_display
        self._w = w
        self._lookup = tracebacks
        self._clock = clock
        self.title = w.HTML(value="<b>nbbatch</b> starting…")
        self.bar = w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="360px"))
        self.label = w.HTML()
        self.workers = w.VBox()
        self.metrics = w.HTML()
        self.errors = w.HTML()
        self.box = w.VBox([self.title, w.HBox([self.bar, self.label]), self.workers, self.metrics, self.errors])
        self._worker_rows: list[tuple[Any, Any]] = []
        self._last: float | None = None
        self._seen_errors: tuple[str, ...] = ()
        self.tracebacks: list[ErrorRow] = []
        self.failure: str | None = None
        self.snapshot: ProgressSnapshot | None = None
        self.closed = False
        self.keep_widget = False
        self.renders = 0
        self.handle: Any = display(self.box, display_id=True)

    # -- Reporter -------------------------------------------------------------------------------
    def update(self, snapshot: ProgressSnapshot) -> None:
        """Show the latest numbers, at most every `min_interval_seconds`."""
        now = self._clock()
        if self._last is not None and now - self._last < self.min_interval_seconds:
            self.snapshot = snapshot
            return
        self._last = now
        self._render(snapshot)

    def close(self, snapshot: ProgressSnapshot) -> None:
        """Show the final numbers, then leave static HTML in place of the widgets."""
        self._render(snapshot)
        self.closed = True
        # A background run ends after its cell did, and frontends (nbclient, JupyterLab) route a
        # display update only while its cell runs: there the widget itself keeps the summary.
        self.keep_widget = threading.current_thread() is not threading.main_thread()
        self._leave_summary()
        if not self.keep_widget:
            self.box.close()

    def show_error(self, exc: BaseException) -> None:
        """Show an exception the run raised (e.g. `WorkerFailed` with the remote traceback)."""
        self.failure = _failure_text(exc)
        if self.snapshot is None:  # it failed before the launcher showed anything (e.g. StoreBusy)
            self.closed = True
            title = f"<b>nbbatch</b> <span style='color:{status_color(Status.FAILED)}'>failed to start</span>"
            self.handle.update(_html(f"<div>{title}{errors_html((), [], self.failure)}</div>"))
            self.box.close()
        elif self.closed:
            self._leave_summary()
        else:
            self.errors.value = errors_html(self.snapshot.errors, self.tracebacks, self.failure)

    # -- rendering ------------------------------------------------------------------------------
    def _refresh_tracebacks(self, s: ProgressSnapshot) -> None:
        if self._lookup is None or not s.errors:
            return
        wanted = min(len(s.errors), _MAX_TRACEBACKS)
        if s.errors == self._seen_errors and len(self.tracebacks) >= wanted:
            return
        try:
            self.tracebacks = self._lookup(s.run_id)
        except Exception:  # the store may be mid-flush; the next update retries
            logger.debug("could not read error tracebacks", exc_info=True)
            return
        self._seen_errors = s.errors

    def _render(self, s: ProgressSnapshot) -> None:
        w = self._w
        self.snapshot = s
        self.renders += 1
        color = status_color(s.status)
        self.title.value = (
            f"<b>nbbatch</b> run <code>{_esc(s.run_name)}</code> "
            f"<span style='color:{color};font-weight:bold'>{_esc(s.status)}</span> · {s.rows:,} samples"
            + (f" · <i>{_esc(s.activity)}…</i>" if s.activity else "")
        )
        self.bar.value = s.fraction
        self.bar.style.bar_color = color
        self.label.value = f"&nbsp;{_esc(counts_text(s))}"
        if len(self._worker_rows) != len(s.workers):
            self._worker_rows = [
                (w.FloatProgress(min=0.0, max=1.0, layout=w.Layout(width="160px", height="14px")), w.HTML())
                for _ in s.workers
            ]
            self.workers.children = [w.HBox([bar, label]) for bar, label in self._worker_rows]
        for (bar, label), worker in zip(self._worker_rows, s.workers):
            bar.value = worker.fraction
            bar.style.bar_color = status_color(Status.FAILED if worker.failed else worker.status)
            label.value = f"<span style='font-size:85%'>&nbsp;{_esc(_worker_line(worker))}</span>"
        self.metrics.value = metrics_html(s.metrics)
        self._refresh_tracebacks(s)
        self.errors.value = errors_html(s.errors, self.tracebacks, self.failure)

    def _leave_summary(self) -> None:
        assert self.snapshot is not None
        text = summary_html(self.snapshot, self.tracebacks, self.failure)
        if self.keep_widget:
            self.box.children = [self._w.HTML(value=text)]
        if self.handle is not None:
            self.handle.update(_html(text))


def _html(text: str) -> Any:
    from IPython.display import HTML

    return HTML(text)


def widget_reporter(store: str | None = None) -> Reporter:
    """The ipywidgets display under a Jupyter kernel, else `terminal_reporter()`.

    Both `torch_batch_process` (``progress=True``) and ``%batchprocess`` get their display here.

    Args:
        store: the run's store, to show the remote tracebacks of recorded errors (looked up by
            the run id each snapshot carries); without it errors show as one line each.
    """
    if not in_jupyter():
        return terminal_reporter()
    return WidgetReporter(tracebacks=store_tracebacks(store) if store else None)
