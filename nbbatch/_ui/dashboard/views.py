"""HTML for the dashboard's tables and panels, from the plain values ``queries`` returns.

Pure functions (no Panel, no store), so they are tested without a browser. Every value from the
store is escaped: run names, messages and tracebacks are user text. Long values (string
outputs, tracebacks, messages, config) are clipped by `clip`: the first characters, a fold with
a bounded prefix, and a link to the full value where the dashboard is served, so a page of
multi-MB strings stays a few KB. Must not import Panel.
"""

from __future__ import annotations

import datetime as dt
import html
import urllib.parse
from collections.abc import Iterable, Sequence
from typing import Any

from nbbatch._store.reader import RUN_COLUMNS
from nbbatch._progress import format_duration, fraction_done, status_color
from nbbatch._run import batch_counts
from nbbatch._ui.dashboard.queries import pretty_json

__all__ = [
    "CELL_CHARS", "FOLD_CHARS", "SHORT_FOLD_CHARS", "STYLE", "SUMMARY_CHARS", "clip", "errors_html",
    "fingerprint_html", "outputs_html", "reduced_html", "run_title_html", "runs_html", "status_badge", "workers_html",
]

STYLE = """
<style>
.nbb-table { border-collapse: collapse; font-size: 13px; width: 100%; }
.nbb-table th { text-align: left; border-bottom: 2px solid #ccc; padding: 3px 8px; white-space: nowrap; }
.nbb-table td { border-bottom: 1px solid #eee; padding: 3px 8px; white-space: nowrap; }
.nbb-table tr.nbb-selected td { background: #eef5ff; }
.nbb-badge { color: white; border-radius: 4px; padding: 1px 6px; font-size: 12px; }
.nbb-bar { background: #eee; width: 120px; height: 10px; display: inline-block; border-radius: 3px; }
.nbb-bar > span { height: 10px; display: block; border-radius: 3px; }
.nbb-error summary { cursor: pointer; }
.nbb-error pre { background: #fbf3f3; padding: 6px; font-size: 12px; white-space: pre-wrap; }
.nbb-muted { color: #777; }
.nbb-long summary { cursor: pointer; }
.nbb-long pre { white-space: pre-wrap; max-height: 320px; max-width: 900px; overflow: auto; font-size: 12px; }
</style>
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


#: Characters of a value shown in a table cell or summary line before it folds.
CELL_CHARS = 120
#: Most characters a fold holds; the rest is behind the full-value link.
FOLD_CHARS = 20_000
#: Characters of an error message in its summary line; a longer one folds below it.
SUMMARY_CHARS = 3 * CELL_CHARS
#: Most characters the fold of an output cell or an error message holds (tracebacks get `FOLD_CHARS`).
SHORT_FOLD_CHARS = FOLD_CHARS // 10
#: Dataset indices listed in an error's summary line.
_INDICES_SHOWN = 10


def clip(value: Any, limit: int = CELL_CHARS, fold: int = FOLD_CHARS, full_url: str | None = None,
         total: int | None = None) -> str:
    """``value`` as escaped HTML, at most ``limit`` characters plus a fold of at most ``fold``.

    Args:
        value: the value (``str()`` of it is shown).
        limit: characters shown before the fold.
        fold: characters the fold shows when opened.
        full_url: a link to the whole value (served dashboards), else a hint where to read it.
        total: the value's full length, where ``value`` is already a prefix of it.
    """
    text = "" if value is None else str(value)
    length = max(len(text), total or 0)
    if length <= limit:
        return html.escape(text)
    rest = length - min(len(text), fold)
    more = f"<br><span class='nbb-muted'>… {rest:,} more characters</span>" if rest > 0 else ""
    full = (f' <a class="nbb-full" href="{html.escape(full_url)}" target="_blank" rel="noopener">full value</a>'
            if full_url else "")
    return (f'<details class="nbb-long"><summary>{html.escape(text[:limit])}… <span class="nbb-muted">'
            f"({length:,} characters)</span></summary><pre>{html.escape(text[:fold])}</pre>{more}{full}</details>")


def _block(value: Any, cls: str = "", limit: int = FOLD_CHARS, full_url: str | None = None,
           total: int | None = None) -> str:
    """A ``<pre>`` of at most ``limit`` characters, then how much is left and the full-value link."""
    text = "" if value is None else str(value)
    length = max(len(text), total or 0)
    out = f'<pre class="{cls}">{html.escape(text[:limit])}</pre>' if cls else f"<pre>{html.escape(text[:limit])}</pre>"
    if length > limit:
        out += f"<span class='nbb-muted'>… {length - limit:,} more characters</span>"
        if full_url:
            out += f' <a class="nbb-full" href="{html.escape(full_url)}" target="_blank" rel="noopener">full value</a>'
    return out


def _link(base: str | None, **query: Any) -> str | None:
    """The full-value URL: ``base`` (the endpoint with ``run=``) plus ``query``; None when not served."""
    return None if base is None else base + "&" + urllib.parse.urlencode(query)


def _time(value: Any) -> str:
    if isinstance(value, dt.datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S") + " UTC"
    return _e(value)


def _clock(value: Any) -> str:
    """Time of day only, where the date is in the runs table already."""
    return value.strftime("%H:%M:%S") if isinstance(value, dt.datetime) else _e(value)


def _rate(value: float | None) -> str:
    return "–" if value is None else (f"{value:,.1f}" if value < 100 else f"{value:,.0f}")


def status_badge(status: str) -> str:
    """A coloured status label (`status_color`, as in the widget); the text is the status itself
    (tests and screen readers read it)."""
    color = status_color(status)
    return f'<span class="nbb-badge nbb-status-{_e(status)}" style="background:{color}">{_e(status)}</span>'


def _bar(percent: float, status: str) -> str:
    """A progress bar in the colour of ``status``, as the widget draws its bars."""
    width = max(0.0, min(100.0, percent))
    return f'<span class="nbb-bar"><span style="width:{width:.1f}%;background:{status_color(status)}"></span></span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "", row_classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        rc = row_classes[i] if i < len(row_classes) else ""
        body.append(f'<tr class="{rc}">' + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return f'<table class="nbb-table {cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def run_title_html(detail: dict[str, Any]) -> str:
    """The selected run's heading: name, status, fraction done, processed of planned batches, rows stored.

    Processed batches include failed (skipped) ones, as the percentage does (`fraction_done`).
    """
    counts = batch_counts(detail)
    done, failed, total = counts["done_batches"], counts["failed_batches"], counts["total_batches"]
    return (f"<h3 class='nbb-title' style='margin:4px 0'>{_e(detail['name'])} {status_badge(detail['status'])} "
            f"<span class='nbb-muted' style='font-size:14px'>{100 * fraction_done(done, failed, total):.0f}% · "
            f"{done + failed}/{total} batches · {counts['rows']} rows stored</span></h3>")


def runs_html(runs: list[dict[str, Any]], selected: str | None) -> str:
    """The runs table: name, status, progress, items/s, ETA, started, duration, workers, errors."""
    if not runs:
        return '<p class="nbb-muted">No runs in this store yet.</p>'
    rows, classes = [], []
    for r in runs:
        eta = "–" if r["eta_s"] is None else format_duration(r["eta_s"])
        rows.append([
            f"<b>{_e(r['name'])}</b>", status_badge(r["status"]),
            (f"{_bar(r['progress'], r['status'])} {r['progress']:.0f}% <span class='nbb-muted'>"
             f"({r['done_batches']}/{r['total_batches']}{f', {failed} failed' if (failed := r['failed_batches']) else ''})"
             f"</span>"),
            _rate(r["items_per_s"]), eta, _time(r["started_at"]),
            "–" if r["duration_s"] is None else format_duration(r["duration_s"]),
            _e(r["workers"]), _e(r["errors"]),
        ])
        classes.append(f"nbb-run nbb-run-{_e(r['run_id'])}" + (" nbb-selected" if r["run_id"] == selected else ""))
    headers = ["name", "status", "progress", "items/s", "ETA", "started", "duration", "workers", "errors"]
    return STYLE + _table(headers, rows, "nbb-runs", classes)


def workers_html(workers: list[dict[str, Any]], attempt: int | None) -> str:
    """Per-worker progress of the current attempt."""
    if not workers:
        return '<p class="nbb-muted">No worker progress recorded yet.</p>'
    rows = []
    for w in workers:
        total, done, failed = int(w["todo"] or 0), int(w["batches"] or 0), int(w["failed"] or 0)
        percent = 100.0 * fraction_done(done, failed, total)
        rows.append([
            _e(w["rank"]), status_badge(str(w["status"])),
            f"{_bar(percent, str(w['status']))} {done + failed}/{total}", _e(w["rows"]), _e(failed), _e("–" if w["current_batch"] is None else w["current_batch"]), _clock(w["updated_at"]),
        ])
    headers = ["rank", "status", "batches", "rows", "failed", "current global_batch", "updated (UTC)"]
    note = f'<p class="nbb-muted">attempt {_e(attempt)}</p>'
    return STYLE + _table(headers, rows, "nbb-workers") + note


def reduced_html(reduced: dict[str, Any] | None) -> str:
    """Reduced metrics as a two-column table (nested values as JSON)."""
    if not reduced:
        return '<p class="nbb-muted">No reduced metrics (yet): they are written when the run ends or stops.</p>'
    rows = [[f"<b>{_e(k)}</b>", clip(v if isinstance(v, (int, float, str)) else pretty_json(v))]
            for k, v in sorted(reduced.items())]
    return STYLE + _table(["metric", "value"], rows, "nbb-reduced")


def errors_html(total: int, errors: list[dict[str, Any]], value_url: str | None = None) -> str:
    """Errors, newest first, each with its traceback folded under a summary line.

    Messages longer than a summary line and tracebacks longer than `FOLD_CHARS` are clipped;
    ``value_url`` (served dashboards) links to the whole text by the error's ``error_id``.
    """
    if not total:
        return '<div class="nbb-errors"><p class="nbb-muted">No errors.</p></div>'
    items = []
    for e in errors:
        indices = list(e["indices"] or [])
        shown = ", ".join(str(i) for i in indices[:_INDICES_SHOWN]) + (", …" if len(indices) > _INDICES_SHOWN else "")
        kind = "fatal" if e["fatal"] else "skipped"
        message = "" if e["message"] is None else str(e["message"])
        message_len = max(len(message), int(e.get("message_len") or 0))
        cut = message_len > SUMMARY_CHARS
        error_id = e.get("error_id")
        folded = (_block(message, "nbb-error-message", limit=SHORT_FOLD_CHARS, total=message_len,
                         full_url=_link(value_url, error=error_id, field="message")) if cut else "")
        items.append(
            f'<details class="nbb-error"><summary><b>{_e(e["exc_type"])}</b>: '
            f'{html.escape(message[:SUMMARY_CHARS]) + ("…" if cut else "")} '
            f'<span class="nbb-muted">({kind}; rank {_e(e["rank"])}, batch_idx {_e(e["batch_idx"])}, '
            f'global_batch {_e(e["global_batch"])}, indices [{_e(shown)}], attempt {_e(e["attempt"])}, '
            f'{_time(e["occurred_at"])})</span></summary>{folded}'
            + _block(e["traceback"], full_url=_link(value_url, error=error_id, field="traceback"),
                     total=e.get("traceback_len"))
            + "</details>"
        )
    more = f'<p class="nbb-muted">showing the newest {len(errors)} of {total}</p>' if total > len(errors) else ""
    return (STYLE + f'<div class="nbb-errors"><p>{total} error{"s" if total != 1 else ""}</p>' + "".join(items)
            + more + "</div>")


def outputs_html(columns: list[str], rows: list[tuple[Any, ...]], value_url: str | None = None) -> str:
    """One page of outputs; long values are clipped, with a link to each whole value when served."""
    if not rows:
        return '<p class="nbb-muted">No outputs stored (yet).</p>'
    at = columns.index("sample_index") if "sample_index" in columns else None
    cells = []
    for row in rows:
        sample = row[at] if at is not None else None
        cells.append([clip(v, fold=SHORT_FOLD_CHARS,
                           full_url=_link(value_url, column=c, sample=sample) if at is not None else None)
                      for c, v in zip(columns, row)])
    return STYLE + _table(columns, cells, "nbb-outputs")


# The runs table's columns, less those shown elsewhere (status badge, JSON blocks, the error) or
# only bookkeeping; derived from the one column list, so a new column shows up here too.
_SHOWN_ELSEWHERE = frozenset({"status", "done_at_start", "launch", "config", "reduced_metrics", "error", "updated_at"})
_FINGERPRINT = tuple(c for c in RUN_COLUMNS if c not in _SHOWN_ELSEWHERE)


def fingerprint_html(detail: dict[str, Any], value_url: str | None = None) -> str:
    """The run's fingerprint and settings, then its config and launch JSON (long values clipped)."""
    rows = [[f"<b>{_e(k)}</b>", _time(detail.get(k)) if k.endswith("_at") else clip(detail.get(k))]
            for k in _FINGERPRINT]
    parts = [STYLE, _table(["field", "value"], rows, "nbb-fingerprint")]
    if detail.get("error"):
        parts.append("<p><b>last failure</b></p>" + _block(detail["error"], full_url=_link(value_url, field="error")))
    parts.append("<p><b>config</b></p>" + _block(pretty_json(detail.get("config") or {}), "nbb-config"))
    launch = detail.get("launch")
    parts.append(
        "<p><b>launch</b></p>" + _block(pretty_json(launch), "nbb-launch") if launch
        else '<p class="nbb-muted">launch: none (started from Python or a notebook)</p>'
    )
    return "".join(parts)
