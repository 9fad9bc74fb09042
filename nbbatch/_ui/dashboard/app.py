"""The dashboard's layout and its once-a-second refresh.

A `Dashboard` owns one session's widgets. Each refresh opens the store read-only for a few
milliseconds (`open_store`), runs the `queries` for what is on screen, closes it, and only then
updates widgets that changed; when the store is locked or unreadable it keeps the last data and
says so. It never writes the store: Stop writes a side file and Resume starts a process
(`control`). Its state is typed: the run's `Status` comes from ``queries`` and the message under
the buttons is a `Note`; nothing is read back from the HTML it shows. Must not import
``_launch``, ``_worker`` or ``_store.writer``.
"""

# mypy: disable-error-code="no-untyped-call"
# (Panel and Bokeh ship without type hints.)
from __future__ import annotations

import enum
import html
import logging
import os
import time
from typing import Any, Literal

import duckdb
import panel as pn
from bokeh.models import ColumnDataSource, DatetimeTickFormatter, HoverTool
from bokeh.plotting import figure

from nbbatch._errors import NbbatchError
from nbbatch._events import Status
from nbbatch._store.connection import StoreOpenError, open_store
from nbbatch._ui.dashboard import REFRESH_MS, control, queries, values, views
from nbbatch._ui.dashboard.auth import Access, Rights

__all__ = ["Dashboard", "Note", "build"]

log = logging.getLogger("nbbatch")

#: Longest a refresh waits for the run's writer to release the file before showing old data.
LOCK_WAIT_SECONDS = 1.0
#: Rows per page of the outputs preview.
PAGE_SIZE = 20
#: Pixel sizes of the plots and controls.
_PLOT_HEIGHT = 220
_SELECT_WIDTH = 320
_BUTTON_WIDTH = 100
_PAGE_BUTTON_WIDTH = 90
_PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def _plot(
    title: str, x_axis_type: Literal["linear", "datetime"] = "linear", x_label: str = "", y_label: str = ""
) -> tuple[Any, ColumnDataSource]:
    source = ColumnDataSource({"x": [], "y": []})
    fig = figure(title=title, height=_PLOT_HEIGHT, sizing_mode="stretch_width", x_axis_type=x_axis_type,
                 toolbar_location="right", tools="pan,wheel_zoom,box_zoom,reset,save")
    fig.line("x", "y", source=source, line_width=2)
    fig.scatter("x", "y", source=source, size=3)
    fig.xaxis.axis_label, fig.yaxis.axis_label = x_label, y_label
    if x_axis_type == "datetime":  # clock times at every zoom; Bokeh's default shows "200ms" on short runs
        clock = "%H:%M:%S"
        fig.xaxis.formatter = DatetimeTickFormatter(
            milliseconds=clock + ".%3N", seconds=clock, minsec=clock, minutes=clock, hourmin="%H:%M", hours="%H:%M",
            context=None,
        )
    fig.add_tools(HoverTool(tooltips=[(x_label or "x", "@x{0,0}" if x_axis_type == "linear" else "@x{%T}"),
                                      (y_label or "y", "@y{0,0.000}")],
                            formatters={"@x": "datetime"} if x_axis_type == "datetime" else {}))
    return fig, source


class Note(enum.Enum):
    """What the message line under the Stop and Resume buttons says, kept as state, never read from HTML.

    Each value is the CSS class of the message (tests and styles find it by that class).
    """

    RESUME_BLOCKED = "nbb-resume-note nbb-muted"  # why Resume is off; goes once it no longer applies
    RESUMING = "nbb-resume-started"  # "Resuming run ..." stays until the next action
    STOP_REQUESTED = "nbb-stop-note"  # goes once the run no longer runs
    REFUSED = "nbb-refused"  # a session without control rights pressed a button


class Dashboard:
    """One session of the dashboard over the store at ``store``.

    Args:
        store: path of the DuckDB store.
        run: name or id of the run to show first (default: the newest).
        page_size: rows per page of the outputs preview.
        full_links: link clipped values to their full text (`values.FullValueHandler` serves them).
        rights: what this session may do (default: everything, as in a notebook); Stop and Resume
            check ``rights.control`` themselves, whatever the browser sends.
    """

    def __init__(self, store: str, run: str | None = None, page_size: int = PAGE_SIZE, rights: Rights | None = None,
                 full_links: bool = False) -> None:
        self.store = os.path.abspath(store)
        self.rights = rights or Rights(True, True)
        self.full_links = full_links  # served by `serve`, which answers the links at `values.PATH`
        self.run_id: str | None = None
        self._wanted = run
        self.page = 0
        self.page_size = page_size
        self.detail: dict[str, Any] | None = None
        self.note: Note | None = None
        self.last_ok: float | None = None
        self.refreshes = 0
        self.period_ms = REFRESH_MS
        self._outputs_key: tuple[Any, ...] | None = None
        self._metric_sources: dict[str, ColumnDataSource] = {}
        self.periodic: Any = None
        self._make_panes()
        self._make_controls()
        self.layout = self._arrange()

    def _make_panes(self) -> None:
        """The HTML panes and plots that each refresh fills."""
        readonly = ("" if self.rights.control else
                    f" <span class='nbb-readonly nbb-muted'>· read-only: {html.escape(self.rights.reason)}</span>")
        self.header = pn.pane.HTML(
            f"<h2 style='margin:0'>nbbatch dashboard</h2><span class='nbb-muted'>store: "
            f"<code>{html.escape(self.store)}</code></span>{readonly}", sizing_mode="stretch_width")

        def pane(css: str, text: str = "") -> Any:
            return pn.pane.HTML(text, css_classes=[css], sizing_mode="stretch_width")

        self.status_line = pane("nbb-refresh", "loading…")
        self.runs_pane, self.run_title = pane("nbb-runs-pane"), pane("nbb-run-title-pane")
        self.message = pane("nbb-message-pane")
        self.workers_pane, self.reduced_pane = pane("nbb-workers-pane"), pane("nbb-reduced-pane")
        self.errors_pane, self.outputs_pane = pane("nbb-errors-pane"), pane("nbb-outputs-pane")
        self.config_pane = pane("nbb-config-pane")
        self.page_label = pn.pane.HTML("", css_classes=["nbb-page-pane"])
        fig, self.throughput_source = _plot("Throughput", "datetime", "time (UTC)", "items/s")
        self.throughput_plot = pn.pane.Bokeh(fig, sizing_mode="stretch_width")
        self.metrics_box = pn.Column(sizing_mode="stretch_width", css_classes=["nbb-metrics-pane"])

    def _make_controls(self) -> None:
        """The run picker, Stop, Resume and the outputs pager, wired to their handlers."""
        self.run_select = pn.widgets.Select(name="Run", options={}, width=_SELECT_WIDTH, css_classes=["nbb-run-select"])
        self.stop_button = pn.widgets.Button(name="Stop", button_type="danger", disabled=True, width=_BUTTON_WIDTH,
                                             css_classes=["nbb-stop"])
        self.resume_button = pn.widgets.Button(name="Resume", button_type="success", disabled=True,
                                               width=_BUTTON_WIDTH, css_classes=["nbb-resume"])
        self.prev_button = pn.widgets.Button(name="◀ Prev", width=_PAGE_BUTTON_WIDTH, disabled=True,
                                             css_classes=["nbb-prev"])
        self.next_button = pn.widgets.Button(name="Next ▶", width=_PAGE_BUTTON_WIDTH, disabled=True,
                                             css_classes=["nbb-next"])
        self.run_select.param.watch(self._on_select, "value")
        self.stop_button.on_click(self._on_stop)
        self.resume_button.on_click(self._on_resume)
        self.prev_button.on_click(lambda event: self._turn(-1))
        self.next_button.on_click(lambda event: self._turn(+1))

    def _arrange(self) -> pn.Column:
        """The page: header, runs, the selected run's controls and cards."""
        card = {"sizing_mode": "stretch_width", "collapsible": True, "margin": (5, 5)}
        return pn.Column(
            self.header, self.status_line,
            pn.Card(self.runs_pane, title="Runs", **card),
            pn.Row(self.run_select, self.stop_button, self.resume_button, align="end"),
            self.run_title, self.message,
            pn.Row(pn.Card(self.workers_pane, title="Workers", **card),
                   pn.Card(self.throughput_plot, title="Throughput", **card), sizing_mode="stretch_width"),
            pn.Row(pn.Card(self.metrics_box, title="Reported metrics per batch", **card),
                   pn.Card(self.reduced_pane, title="Reduced metrics", **card), sizing_mode="stretch_width"),
            pn.Card(self.errors_pane, title="Errors", **card),
            pn.Card(pn.Row(self.prev_button, self.next_button, self.page_label), self.outputs_pane,
                    title="Outputs", **card),
            pn.Card(self.config_pane, title="Fingerprint and config", collapsed=False, **card),
            sizing_mode="stretch_width",
        )

    # -- refresh --------------------------------------------------------------------------------
    def start(self, period_ms: int = REFRESH_MS) -> None:
        """Refresh now and then every ``period_ms`` (tied to the session when served)."""
        self.period_ms = period_ms
        self.refresh()
        self.periodic = pn.state.add_periodic_callback(self.refresh, period=period_ms)

    def refresh(self) -> None:
        """Read what is on screen in one short read-only visit to the store, then update widgets."""
        try:
            data = self._read()
        except Exception as exc:  # a refresh never raises: keep the last data and say why
            if not isinstance(exc, (StoreOpenError, NbbatchError, duckdb.Error)):
                log.debug("dashboard refresh failed", exc_info=True)
            text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            since = ""
            if self.last_ok is not None:
                since = f" (showing data from {time.strftime('%H:%M:%S', time.localtime(self.last_ok))})"
            self._set(self.status_line, f"<span class='nbb-stale' style='color:#b36b00'>store not readable now: "
                                        f"{html.escape(text)}{html.escape(since)}</span>")
            return
        self.last_ok = time.time()
        self.refreshes += 1
        try:
            self._apply(data)
        except Exception:  # a bad value must not end the session's refresh loop
            log.warning("the nbbatch dashboard could not show the latest data", exc_info=True)

    def _read(self) -> dict[str, Any]:
        data: dict[str, Any] = {}
        with open_store(self.store, write=False, timeout=LOCK_WAIT_SECONDS) as con:
            data["runs"] = runs = queries.runs(con, time.time())
            ids = [r["run_id"] for r in runs]
            if self.run_id not in ids:
                wanted = [r["run_id"] for r in runs if self._wanted in (r["name"], r["run_id"])]
                self.run_id = wanted[0] if wanted else (ids[0] if ids else None)
                self.page = 0
            run_id = self.run_id
            if run_id is None:
                return data
            data["detail"] = detail = queries.run_detail(con, run_id)
            data["workers"] = queries.workers(con, run_id, int(detail["attempt"] or 0), detail["status"])
            data["throughput"] = queries.throughput(con, run_id)
            data["metrics"] = queries.metric_series(con, run_id)
            data["errors"] = queries.errors(con, run_id)
            key = (run_id, self.page, detail["committed_rows"], detail["status"])
            if key != self._outputs_key:
                data["outputs"] = queries.outputs_page(con, run_id, self.page, self.page_size)
                self._outputs_key = key
        return data

    @staticmethod
    def _set(pane: Any, value: Any, name: str = "object") -> None:
        if getattr(pane, name) != value:  # unchanged widgets send nothing to the browser
            setattr(pane, name, value)

    def _apply(self, data: dict[str, Any]) -> None:
        runs = data["runs"]
        self._set(self.status_line, f"<span class='nbb-muted nbb-fresh'>updated {time.strftime('%H:%M:%S')}"
                                    f" · {len(runs)} run{'s' if len(runs) != 1 else ''} · refresh every "
                                    f"{self.period_ms / 1000:g} s</span>")
        self._set(self.runs_pane, views.runs_html(runs, self.run_id))
        options = {r["name"]: r["run_id"] for r in runs}
        self._set(self.run_select, options, "options")
        if self.run_id is not None:
            self._set(self.run_select, self.run_id, "value")
        detail = data.get("detail")
        self.detail = detail
        if detail is None:
            for pane in (self.run_title, self.workers_pane, self.reduced_pane, self.errors_pane, self.outputs_pane,
                         self.config_pane):
                self._set(pane, "")
            self.stop_button.disabled = self.resume_button.disabled = True
            return
        self._set(self.run_title, views.run_title_html(detail))
        self._controls(detail)
        self._set(self.workers_pane, views.workers_html(data["workers"], detail["attempt"]))
        self._set(self.reduced_pane, views.reduced_html(detail.get("reduced_metrics")))
        link = values.value_url(str(detail["run_id"])) if self.full_links else None
        error_count, newest_errors = data["errors"]
        self._set(self.errors_pane, views.errors_html(error_count, newest_errors, value_url=link))
        self._set(self.config_pane, views.fingerprint_html(detail, value_url=link))
        if "outputs" in data:
            total, columns, rows = data["outputs"]
            pages = max(1, -(-total // self.page_size))
            first = self.page * self.page_size
            self._set(self.page_label, f"<span class='nbb-page'>rows {first + 1 if rows else 0}–{first + len(rows)} "
                                       f"of {total:,} (page {self.page + 1} of {pages})</span>")
            self._set(self.outputs_pane, views.outputs_html(columns, rows, value_url=link))
            self._set(self.prev_button, self.page <= 0, "disabled")
            self._set(self.next_button, self.page + 1 >= pages, "disabled")
        self._plots(data["throughput"], data["metrics"])

    def _controls(self, detail: dict[str, Any]) -> None:
        """Stop and Resume for the selected run's `Status`, and whether the current `Note` still applies."""
        status: Status = detail["status"]
        live = status in control.STOPPABLE  # an interrupted run has nobody to read a stop request
        self._set(self.stop_button, not live or not self.rights.control, "disabled")
        self._set(self.resume_button, not (control.can_resume(detail, self.store) and self.rights.control),
                  "disabled")
        blocker = control.resume_blocker(detail, self.store) if status in control.RESUMABLE else None
        if blocker and self.note is not Note.RESUMING:  # "Resuming run ..." stays until the next action
            self._say(Note.RESUME_BLOCKED, f"Resume: {blocker}")
        elif (not blocker and self.note is Note.RESUME_BLOCKED) or (not live and self.note is Note.STOP_REQUESTED):
            self._say(None)  # the note no longer applies

    def _plots(self, throughput: list[dict[str, Any]], metrics: dict[str, list[tuple[float, float]]]) -> None:
        new = {"x": [p["time"] for p in throughput], "y": [p["rate"] for p in throughput]}
        if new != dict(self.throughput_source.data):
            self.throughput_source.data = new
        if sorted(metrics) != sorted(self._metric_sources):
            plots: list[Any] = []
            self._metric_sources = {}
            for i, series in enumerate(sorted(metrics)):
                fig, source = _plot(series, "linear", "global_batch", series.rsplit("/", 1)[-1])
                fig.renderers[0].glyph.line_color = _PALETTE[i % len(_PALETTE)]
                self._metric_sources[series] = source
                plots.append(pn.pane.Bokeh(fig, sizing_mode="stretch_width"))
            self.metrics_box.objects = plots or [pn.pane.HTML("<p class='nbb-muted'>No metrics reported (yet).</p>")]
        for series, points in metrics.items():
            source = self._metric_sources[series]
            new = {"x": [p[0] for p in points], "y": [p[1] for p in points]}
            if new != dict(source.data):
                source.data = new
        if pn.state.curdoc is None or pn.state.curdoc.session_context is None:
            pn.io.push_notebook(self.throughput_plot, self.metrics_box)  # in-place Bokeh changes in a notebook

    def _say(self, note: Note | None, text: str = "") -> None:
        """Show ``text`` (plain, escaped here) as ``note``, or clear the message with None."""
        self.note = note
        shown = f"<div class='nbb-message'><span class='{note.value}'>{html.escape(text)}</span></div>" if note else ""
        self._set(self.message, shown)

    # -- controls -------------------------------------------------------------------------------
    def _on_select(self, event: Any) -> None:
        if event.new and event.new != self.run_id:
            self.run_id, self.page, self._outputs_key = event.new, 0, None
            self._say(None)
            self.refresh()

    def _turn(self, step: int) -> None:
        self.page = max(0, self.page + step)
        self._outputs_key = None
        self.refresh()

    def _refused(self) -> bool:
        """Stop and Resume act only for a session with control rights, whatever the browser sent."""
        if self.rights.control:
            return False
        log.warning("nbbatch dashboard: refused Stop/Resume from a session without control rights")
        self._say(Note.REFUSED, f"Refused: {self.rights.reason}")
        return True

    def _on_stop(self, event: Any) -> None:
        if self.run_id is None or self._refused():
            return
        try:
            text = control.stop(self.store, self.run_id)
        except OSError as exc:
            text = f"could not request a stop: {exc}"
        self._say(Note.STOP_REQUESTED, text)
        self.stop_button.disabled = True

    def _on_resume(self, event: Any) -> None:
        if self.detail is None or self._refused():
            return
        try:
            text = control.resume(self.store, self.detail)
        except (ValueError, OSError) as exc:
            text = f"cannot resume: {exc}"
        self._say(Note.RESUMING, text)
        self.resume_button.disabled = True


def session_rights(access: Access | None) -> Rights:
    """What the current session may do: everything in a notebook (the kernel's own user); in a
    served session, what ``access`` grants the request that created it (read-only on loopback
    where no policy was given, e.g. ``layout.show()``)."""
    context = pn.state.curdoc.session_context if pn.state.curdoc is not None else None
    request = getattr(context, "request", None)
    if request is None:
        return Rights(True, True)
    return (access or Access()).session_rights(
        dict(request.headers or {}), dict(request.cookies or {}), dict(request.arguments or {}), pn.state.user)


def build(store: str, run: str | None = None, period_ms: int = REFRESH_MS, access: Access | None = None,
          full_links: bool = False) -> pn.viewable.Viewable:
    """The dashboard's layout for one session, refreshing every ``period_ms``.

    ``access`` is the served dashboard's policy (`auth.Access`); a session it does not allow to
    see the runs gets a one-line refusal and reads nothing. ``full_links``: see `Dashboard`.
    """
    rights = session_rights(access)
    if not rights.view:
        return pn.pane.HTML(f"<p class='nbb-refused'>nbbatch dashboard: {html.escape(rights.reason)}</p>")
    board = Dashboard(store, run=run, rights=rights, full_links=full_links)
    board.start(period_ms)
    board.layout._nbbatch_dashboard = board  # type: ignore[attr-defined]  # reachable for tests and notebooks
    return board.layout
