"""Read-only SQL behind every dashboard view; plain Python values out, no Panel in.

Each function takes a short-lived cursor (the caller opens the store for one refresh and closes
it) and returns lists of dicts, so the views and the benchmark share exactly these queries. All
values are bound parameters; the only SQL spliced in is the outputs view from
``reader.outputs_sql``. Series are bucketed in SQL so a long run never ships more than a few
hundred points per plot. Must not import Panel, ``_launch``, ``_worker`` or ``_store.writer``.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from typing import Any

import duckdb

from nbbatch._errors import StoreError
from nbbatch._events import Status
from nbbatch._progress import RATE_WINDOW_SECONDS, fraction_done
from nbbatch._run import batch_counts
from nbbatch._store import inputs, reader
from nbbatch._store.schema import KEY_COLUMNS
from nbbatch._store.sql import ident

__all__ = [
    "MAX_ERRORS", "MAX_POINTS", "MAX_SERIES", "TEXT_CHARS", "errors", "metric_series", "outputs_page", "pretty_json",
    "run_detail", "runs", "throughput", "workers",
]

#: Longest error message or traceback text read per refresh (views show less; the rest is a click away).
TEXT_CHARS = 20_000
#: Most points per plotted series; longer series are averaged into this many buckets.
MAX_POINTS = 400
#: Most metric series plotted (the first ones by name).
MAX_SERIES = 12
#: Newest errors read per refresh (the count says how many there are in all).
MAX_ERRORS = 50
#: Items of a vector output shown in a table cell.
_CELL_ITEMS = 8

_RATES = """
WITH log AS (
    SELECT l.run_id, l.ts, l.rows, r.started_at, r.finished_at
    FROM progress_log l JOIN runs r ON l.run_id = r.run_id AND l.attempt = r.attempt
), last AS (
    SELECT run_id, max(ts) AS ts FROM log GROUP BY run_id
)
SELECT log.run_id,
       arg_max(log.rows, log.ts) AS rows_now,
       arg_min(log.rows, log.ts) FILTER (WHERE log.ts >= last.ts - to_microseconds(?::BIGINT)) AS rows_then,
       epoch(max(log.ts)) - epoch(min(log.ts) FILTER (WHERE log.ts >= last.ts - to_microseconds(?::BIGINT))) AS span,
       any_value(epoch(coalesce(log.finished_at, last.ts)) - epoch(log.started_at)) AS attempt_seconds
FROM log JOIN last USING (run_id)
GROUP BY log.run_id
"""


def _epoch(value: Any) -> float | None:
    """A naive-UTC TIMESTAMP from the store as epoch seconds."""
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=dt.timezone.utc).timestamp()
    return float(value)


def runs(con: duckdb.DuckDBPyConnection, now: float) -> list[dict[str, Any]]:
    """One row per run, newest first: status, progress %, items/s, ETA, started, duration, workers.

    Args:
        con: a read cursor on the store.
        now: epoch seconds, for the duration of a running run.

    Example:
        >>> with open_store("nbbatch.duckdb", write=False) as con:   # doctest: +SKIP
        ...     [r["name"] for r in runs(con, time.time())]
    """
    summaries = reader.list_runs(con)
    window = int(RATE_WINDOW_SECONDS * 1e6)  # microseconds
    rates = {r[0]: r[1:] for r in con.execute(_RATES, [window, window]).fetchall()}
    out = []
    for s in summaries:
        counts = batch_counts(s)
        total, done, failed = counts["total_batches"], counts["done_batches"], counts["failed_batches"]
        started, finished = _epoch(s["started_at"]), _epoch(s["finished_at"])
        rate: float | None = None
        rows_now, rows_then, span, attempt_seconds = rates.get(s["run_id"], (None, None, None, None))
        live = s["status"] == Status.RUNNING
        if live:
            if rows_now is not None and rows_then is not None and span and span > 0:
                rate = (rows_now - rows_then) / span
        elif rows_now and attempt_seconds and attempt_seconds > 0:
            rate = rows_now / attempt_seconds  # the whole last attempt's average
        remaining = max(0, total - done - failed) * int(s["batch_size"] or 1)
        if s["dataset_len"] is not None:
            remaining = min(remaining, max(0, int(s["dataset_len"]) - int(s["committed_rows"] or 0)))
        eta = None
        if live and rate and rate > 0:
            eta = remaining / rate
        elif s["status"] == Status.DONE:
            eta = 0.0
        end = finished if finished is not None and not live else now  # interrupted: the last sign of life
        out.append({
            "run_id": s["run_id"], "name": s["name"], "status": Status(s["status"]),
            "progress": 100.0 * fraction_done(done, failed, total),
            "done_batches": done, "failed_batches": failed, "total_batches": total, "rows": int(s["committed_rows"] or 0),
            "items_per_s": rate, "eta_s": eta, "started_at": s["started_at"],
            "duration_s": None if started is None else max(0.0, end - started),
            "workers": s["world_size"], "errors": int(s["errors"] or 0), "launch": s["launch"],
        })
    return out


def run_detail(con: duckdb.DuckDBPyConnection, run_id: str) -> dict[str, Any]:
    """The run's row (fingerprint, config, launch, reduced metrics) plus counts; raises RunNotFound."""
    summary = reader.run_summary(con, run_id)
    summary["status"] = Status(summary["status"])  # typed from here on: the app compares, never parses
    summary["done_batches"] = batch_counts(summary)["done_batches"]
    return summary


def workers(con: duckdb.DuckDBPyConnection, run_id: str, attempt: int, status: str | None = None) -> list[dict[str, Any]]:
    """Live counters of each worker in the run's current attempt.

    Args:
        status: the run's status as `run_detail` reports it; workers of an ``interrupted`` run
            still marked ``running`` are shown ``interrupted`` (they went with their launcher).
    """
    cur = con.execute(
        "SELECT rank, batches, todo, rows, failed, current_batch, status, updated_at FROM progress "
        "WHERE run_id = ? AND attempt = ? ORDER BY rank",
        [run_id, attempt],
    )
    names = [d[0] for d in cur.description]
    rows = [dict(zip(names, row)) for row in cur.fetchall()]
    if status == Status.INTERRUPTED:
        for row in rows:
            if row["status"] == Status.RUNNING:
                row["status"] = Status.INTERRUPTED
    return rows


def throughput(con: duckdb.DuckDBPyConnection, run_id: str, points: int = MAX_POINTS) -> list[dict[str, Any]]:
    """Items/s over time, every attempt, from the cumulative ``progress_log`` rows.

    Consecutive log rows give a rate each; they are averaged into at most ``points`` time buckets
    (sum of items over sum of seconds, so a bucket's rate stays exact).
    """
    row = con.execute("SELECT epoch(min(ts)), epoch(max(ts)) FROM progress_log WHERE run_id = ?", [run_id]).fetchone()
    if row is None or row[0] is None:
        return []
    lo, hi = row
    step = max((hi - lo) / points, 1e-6)
    cur = con.execute(
        """
        WITH l AS (
            SELECT attempt, ts, rows FROM progress_log WHERE run_id = ?
            UNION ALL  -- the current attempt starts from 0 rows at started_at
            SELECT attempt, started_at, 0 FROM runs WHERE run_id = ? AND started_at IS NOT NULL
        ), d AS (
            SELECT attempt, epoch(ts) AS t,
                   rows - lag(rows) OVER w AS items,
                   epoch(ts) - epoch(lag(ts) OVER w) AS seconds
            FROM l WINDOW w AS (PARTITION BY attempt ORDER BY ts)
        )
        SELECT attempt, floor((t - ?) / ?) AS bucket, max(t) AS t, sum(items) / sum(seconds) AS rate
        FROM d WHERE seconds > 0
        GROUP BY attempt, bucket ORDER BY t
        """,
        [run_id, run_id, lo, step],
    )
    return [
        {"attempt": a, "time": dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).replace(tzinfo=None), "rate": r}
        for a, _, t, r in cur.fetchall()
    ]


def metric_series(
    con: duckdb.DuckDBPyConnection, run_id: str, points: int = MAX_POINTS, max_series: int = MAX_SERIES
) -> dict[str, list[tuple[float, float]]]:
    """``report_metrics`` values per ``group/name``: ``(global_batch, value)`` points, bucketed.

    Metrics reported outside a batch (in ``on_finish``) have no ``global_batch`` and use
    ``steps_completed`` on the x axis. Non-numeric values (``value_json``) are left out.
    """
    row = con.execute(
        "SELECT min(coalesce(global_batch, steps_completed, 0)), max(coalesce(global_batch, steps_completed, 0)) "
        "FROM metrics WHERE run_id = ? AND value IS NOT NULL",
        [run_id],
    ).fetchone()
    if row is None or row[0] is None:
        return {}
    lo, hi = row
    step = max(1, math.ceil((hi - lo + 1) / points))
    cur = con.execute(
        """
        WITH m AS (
            SELECT coalesce("group", '') || '/' || name AS series, coalesce(global_batch, steps_completed, 0) AS x, value
            FROM metrics WHERE run_id = ? AND value IS NOT NULL AND isfinite(value)
        ), keep AS (
            SELECT DISTINCT series FROM m ORDER BY series LIMIT ?
        )
        SELECT series, (x // ?) * ? AS xb, avg(value) FROM m SEMI JOIN keep USING (series)
        GROUP BY series, xb ORDER BY series, xb
        """,
        [run_id, max_series, step, step],
    )
    out: dict[str, list[tuple[float, float]]] = {}
    for series, x, value in cur.fetchall():
        out.setdefault(str(series).lstrip("/"), []).append((float(x), float(value)))
    return out


def errors(con: duckdb.DuckDBPyConnection, run_id: str, limit: int = MAX_ERRORS) -> tuple[int, list[dict[str, Any]]]:
    """How many errors the run recorded, and the newest ``limit`` with tracebacks."""
    total = con.execute("SELECT count(*) FROM errors WHERE run_id = ?", [run_id]).fetchone()
    # Texts are cut in SQL: this runs every refresh, and a 2 MB traceback would cross each time.
    # `error_id` (the row's id) fetches the whole text on demand (`values.full_value`).
    cur = con.execute(
        "SELECT attempt, rank, global_batch, batch_idx, indices, exc_type, left(message, ?) AS message, "
        "length(message) AS message_len, left(traceback, ?) AS traceback, length(traceback) AS traceback_len, "
        "fatal, occurred_at, rowid AS error_id FROM errors WHERE run_id = ? ORDER BY occurred_at DESC LIMIT ?",
        [TEXT_CHARS, TEXT_CHARS, run_id, limit],
    )
    names = [d[0] for d in cur.description]
    return int(total[0] if total else 0), [dict(zip(names, row)) for row in cur.fetchall()]


def _cell(value: Any, limit: int = _CELL_ITEMS) -> Any:
    """A short display form of an output value (vectors show their first items and length)."""
    if isinstance(value, (list, tuple)):
        head = ", ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in value[:limit])
        return f"[{head}{', …' if len(value) > limit else ''}] ({len(value)})"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    return value


def outputs_page(
    con: duckdb.DuckDBPyConnection, run_id: str, page: int, page_size: int = 20
) -> tuple[int, list[str], list[tuple[Any, ...]]]:
    """One page of the run's outputs in ``sample_index`` order: ``(total rows, columns, rows)``.

    For a run over a `TableDataset` the page's input rows are joined in (``inputs.joined_sql``).
    The page starts at the ``page * page_size``-th smallest ``sample_index``: computed when the
    indices have no gaps, else found by a top-N over that one column; then ``page_size`` full rows
    are read from there (zone maps skip most row groups), instead of an OFFSET over every column.
    """
    table = f"({reader.outputs_sql(con, run_id)}) AS o"  # committed segments and inline rows alike
    counted = con.execute(f"SELECT count(*), min(sample_index), max(sample_index) FROM {table}").fetchone()
    total, lo, hi = (int(counted[0]), int(counted[1] or 0), int(counted[2] or 0)) if counted else (0, 0, 0)
    if not total:
        return 0, list(KEY_COLUMNS), []
    columns = list(reader.outputs_relation(con, run_id).columns)
    offset = max(0, page) * page_size
    if offset >= total:
        return total, columns, []
    if hi - lo + 1 == total:
        start = lo + offset  # no gaps (nothing skipped): the page starts at a known index
    else:
        found = con.execute(
            f"SELECT sample_index FROM {table} ORDER BY sample_index LIMIT 1 OFFSET ?", [offset]
        ).fetchone()
        start = found[0] if found else lo
    quoted = ", ".join(ident(c) for c in columns)
    sql = f"SELECT {quoted} FROM {table} WHERE sample_index >= ? ORDER BY sample_index LIMIT ?"
    sql = _with_inputs(con, run_id, sql, columns) or sql
    cur = con.execute(sql, [start, page_size])
    columns = [d[0] for d in cur.description]
    return total, columns, [tuple(_cell(v) for v in row) for row in cur.fetchall()]


def _with_inputs(con: duckdb.DuckDBPyConnection, run_id: str, page: str, columns: list[str]) -> str | None:
    """The page joined to its input rows, for a run over a `TableDataset` (None otherwise, or without its snapshot)."""
    try:
        return inputs.joined_sql(con, run_id, page, columns, with_keys=True)
    except StoreError:  # the snapshot file was removed: the outputs alone are still worth showing
        return None


def pretty_json(value: Any) -> str:
    """JSON for display (config, launch, reduced metrics); other values as their text."""
    return json.dumps(value, indent=2, sort_keys=True, default=str)
