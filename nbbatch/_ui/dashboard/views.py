"""HTML for the dashboard's tables and panels, from the plain values ``queries`` returns.

Pure functions (no Panel, no store), so they are tested without a browser. Every value from the
store is escaped: run names, messages and tracebacks are user text. Must not import Panel.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable, Sequence
from typing import Any

from nbbatch._progress import format_duration
from nbbatch._ui.dashboard.queries import pretty_json

__all__ = [
    "STYLE", "errors_html", "fingerprint_html", "outputs_html", "reduced_html", "runs_html", "status_badge",
    "workers_html",
]

_COLORS = {"running": "#1f77b4", "done": "#2ca02c", "failed": "#d62728", "preempted": "#ff7f0e"}

STYLE = """
<style>
.nbb-table { border-collapse: collapse; font-size: 13px; width: 100%; }
.nbb-table th { text-align: left; border-bottom: 2px solid #ccc; padding: 3px 8px; white-space: nowrap; }
.nbb-table td { border-bottom: 1px solid #eee; padding: 3px 8px; white-space: nowrap; }
.nbb-table tr.nbb-selected td { background: #eef5ff; }
.nbb-badge { color: white; border-radius: 4px; padding: 1px 6px; font-size: 12px; }
.nbb-bar { background: #eee; width: 120px; height: 10px; display: inline-block; border-radius: 3px; }
.nbb-bar > span { background: #1f77b4; height: 10px; display: block; border-radius: 3px; }
.nbb-error summary { cursor: pointer; }
.nbb-error pre { background: #fbf3f3; padding: 6px; font-size: 12px; white-space: pre-wrap; }
.nbb-muted { color: #777; }
</style>
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


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
    """A colored status label; the text is the status itself (tests and screen readers read it)."""
    color = _COLORS.get(status, "#777")
    return f'<span class="nbb-badge nbb-status-{_e(status)}" style="background:{color}">{_e(status)}</span>'


def _bar(percent: float) -> str:
    return f'<span class="nbb-bar"><span style="width:{max(0.0, min(100.0, percent)):.1f}%"></span></span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "", row_classes: Sequence[str] = ()) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = []
    for i, row in enumerate(rows):
        rc = row_classes[i] if i < len(row_classes) else ""
        body.append(f'<tr class="{rc}">' + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>")
    return f'<table class="nbb-table {cls}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def runs_html(runs: list[dict[str, Any]], selected: str | None) -> str:
    """The runs table: name, status, progress, items/s, ETA, started, duration, workers, errors."""
    if not runs:
        return '<p class="nbb-muted">No runs in this store yet.</p>'
    rows, classes = [], []
    for r in runs:
        eta = "–" if r["eta_s"] is None else format_duration(r["eta_s"])
        rows.append([
            f"<b>{_e(r['name'])}</b>", status_badge(r["status"]),
            (f"{_bar(r['progress'])} {r['progress']:.0f}% <span class='nbb-muted'>"
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
        total = int(w["todo"] or 0)
        done = int(w["batches"] or 0)
        percent = 100.0 if total == 0 else 100.0 * done / total
        rows.append([
            _e(w["rank"]), status_badge(str(w["status"])), f"{_bar(percent)} {done}/{total}", _e(w["rows"]),
            _e(w["failed"]), _e("–" if w["current_batch"] is None else w["current_batch"]), _clock(w["updated_at"]),
        ])
    headers = ["rank", "status", "batches", "rows", "failed", "current global_batch", "updated (UTC)"]
    note = f'<p class="nbb-muted">attempt {_e(attempt)}</p>'
    return STYLE + _table(headers, rows, "nbb-workers") + note


def reduced_html(reduced: dict[str, Any] | None) -> str:
    """Reduced metrics as a two-column table (nested values as JSON)."""
    if not reduced:
        return '<p class="nbb-muted">No reduced metrics (yet): they are written when the run ends or stops.</p>'
    rows = [[f"<b>{_e(k)}</b>", _e(v if isinstance(v, (int, float, str)) else pretty_json(v))]
            for k, v in sorted(reduced.items())]
    return STYLE + _table(["metric", "value"], rows, "nbb-reduced")


def errors_html(total: int, errors: list[dict[str, Any]]) -> str:
    """Errors, newest first, each with its traceback folded under a summary line."""
    if not total:
        return '<div class="nbb-errors"><p class="nbb-muted">No errors.</p></div>'
    items = []
    for e in errors:
        indices = list(e["indices"] or [])
        shown = ", ".join(str(i) for i in indices[:10]) + (", …" if len(indices) > 10 else "")
        kind = "fatal" if e["fatal"] else "skipped"
        items.append(
            f'<details class="nbb-error"><summary><b>{_e(e["exc_type"])}</b>: {_e(e["message"])} '
            f'<span class="nbb-muted">({kind}; rank {_e(e["rank"])}, batch_idx {_e(e["batch_idx"])}, '
            f'global_batch {_e(e["global_batch"])}, indices [{_e(shown)}], attempt {_e(e["attempt"])}, '
            f'{_time(e["occurred_at"])})</span></summary><pre>{_e(e["traceback"])}</pre></details>'
        )
    more = f'<p class="nbb-muted">showing the newest {len(errors)} of {total}</p>' if total > len(errors) else ""
    return (STYLE + f'<div class="nbb-errors"><p>{total} error{"s" if total != 1 else ""}</p>' + "".join(items)
            + more + "</div>")


def outputs_html(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    """One page of outputs."""
    if not rows:
        return '<p class="nbb-muted">No outputs stored (yet).</p>'
    return STYLE + _table(columns, [[_e(v) for v in row] for row in rows], "nbb-outputs")


_FINGERPRINT = ("run_id", "name", "processor", "dataset_len", "batch_size", "max_batches", "checkpoint_interval",
                "planned_batches", "real_batches", "world_size", "attempt", "on_error", "max_failures", "output_dir",
                "host", "pid", "created_at", "started_at", "finished_at")


def fingerprint_html(detail: dict[str, Any]) -> str:
    """The run's fingerprint and settings, then its config and launch JSON."""
    rows = [[f"<b>{_e(k)}</b>", _time(detail.get(k)) if k.endswith("_at") else _e(detail.get(k))]
            for k in _FINGERPRINT]
    parts = [STYLE, _table(["field", "value"], rows, "nbb-fingerprint")]
    if detail.get("error"):
        parts.append(f'<p><b>last failure</b></p><pre>{_e(detail["error"])}</pre>')
    parts.append(f'<p><b>config</b></p><pre class="nbb-config">{_e(pretty_json(detail.get("config") or {}))}</pre>')
    launch = detail.get("launch")
    parts.append(
        f'<p><b>launch</b></p><pre class="nbb-launch">{_e(pretty_json(launch))}</pre>' if launch
        else '<p class="nbb-muted">launch: none (started from Python or a notebook)</p>'
    )
    return "".join(parts)
