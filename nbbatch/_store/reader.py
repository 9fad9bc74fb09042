"""Read-side queries over the store, shared by the Run handle, the CLI and the dashboard.

Every query uses bound parameters; identifiers reach SQL text only through ``sql.ident``. Run
summaries carry the status readers report: a ``running`` row whose writer lock nobody holds is
``interrupted`` (``lock.resolve_status``), with a synthesized ``error`` and ``finished_at`` (the
last time the run was heard from), unless its writer left an end record in the lock file (its
final status did not fit on a full disk): then the run has that record's status and error. Must not import anything from nbbatch but ``_store``,
``_events`` and ``_errors``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import duckdb

from nbbatch._errors import RunNotFound, StoreError
from nbbatch._events import Status
from nbbatch._store.connection import StoreOpenError, open_store, relation_connection
from nbbatch._store import segments
from nbbatch._store.arrow import timestamp
from nbbatch._store.lock import End, ended, interrupted_error, resolve_status, writer_alive
from nbbatch._store.schema import OUTPUT_KEYS, RUNS, outputs_table_name
from nbbatch._store.sql import ident, type_name

__all__ = [
    "RUN_COLUMNS",
    "RecordedError",
    "error_counts",
    "errors_relation",
    "find_run",
    "latest_errors",
    "list_runs",
    "metrics_relation",
    "outputs_relation",
    "outputs_sql",
    "reading",
    "relation_cursor",
    "run_summary",
    "store_path",
]

#: The columns of the ``runs`` table, as every run summary has them (options are columns; ``config``
#: holds only the call's options that have no column of their own).
RUN_COLUMNS = RUNS.names
_RECENT_RUNS = 5  # named in the error for a run that is not there

_SUMMARY = f"""
SELECT {", ".join(f"r.{ident(c)}" for c in RUN_COLUMNS)},
       coalesce(b.committed, 0) AS committed_batches,
       coalesce(b.rows, 0) AS committed_rows,
       coalesce(p.batches, 0) AS live_batches,
       coalesce(p.rows, 0) AS live_rows,
       coalesce(p.failed, 0) AS live_failed,
       coalesce(e.errors, 0) AS errors
FROM runs r
LEFT JOIN (SELECT run_id, count(*) AS committed, sum(rows) AS rows FROM batches GROUP BY run_id) b USING (run_id)
LEFT JOIN (SELECT run_id, attempt, sum(batches) AS batches, sum(rows) AS rows, sum(failed) AS failed
           FROM progress GROUP BY run_id, attempt) p ON p.run_id = r.run_id AND p.attempt = r.attempt
LEFT JOIN (SELECT run_id, count(*) AS errors FROM errors GROUP BY run_id) e ON e.run_id = r.run_id
"""


@contextmanager
def reading(path: str) -> Iterator[duckdb.DuckDBPyConnection]:
    """A short-lived read cursor on the store, as a StoreError on failure."""
    try:
        with open_store(path, write=False) as con:
            yield con
    except StoreOpenError as exc:
        raise StoreError(str(exc)) from exc
    except duckdb.CatalogException as exc:
        raise StoreError(f"`{path}` holds no nbbatch tables ({str(exc).splitlines()[0]}); pass the right `store=`") from exc


def relation_cursor(path: str) -> duckdb.DuckDBPyConnection:
    """A long-lived cursor for relations handed to users."""
    try:
        return relation_connection(path)
    except StoreOpenError as exc:
        raise StoreError(str(exc)) from exc


def _row_dict(cursor: duckdb.DuckDBPyConnection, row: tuple[Any, ...]) -> dict[str, Any]:
    names = [d[0] for d in cursor.description]
    out = dict(zip(names, row))
    for key in ("launch", "config", "reduced_metrics"):
        if isinstance(out.get(key), str):
            out[key] = json.loads(out[key])
    return out


def store_path(con: duckdb.DuckDBPyConnection) -> str | None:
    """The file behind ``con`` (None for an in-memory database)."""
    row = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchone()
    return str(row[0]) if row and row[0] else None


def _with_live_status(con: duckdb.DuckDBPyConnection, summaries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Report each run's status as a `Status`; ``running`` without a lock holder becomes ``interrupted``
    or, with a matching end record in the lock file, that record's status and error."""
    alive: bool | None = None
    end: End | None = None
    if any(s["status"] == Status.RUNNING for s in summaries):
        path = store_path(con)
        alive = writer_alive(path) if path else None  # one look at the lock serves every row
        end = ended(path) if path and alive is not True else None
    for s in summaries:
        s["status"] = status = resolve_status(str(s["status"]), alive)
        if status in (Status.RUNNING, Status.INTERRUPTED) and end is not None \
                and (end.run_id, end.attempt) == (s["run_id"], s["attempt"]):
            # Its writer ended it but the store had no room for the status (``lock.py``).
            s["status"], s["error"], s["finished_at"] = end.status, end.error, timestamp(end.at)
            continue
        if status is Status.INTERRUPTED:
            if s.get("error") is None:
                s["error"] = interrupted_error(str(s["name"]), s.get("pid"), s.get("host"))
            if s.get("finished_at") is None:
                s["finished_at"] = s.get("updated_at")
    return summaries


def run_summary(con: duckdb.DuckDBPyConnection, name_or_id: str) -> dict[str, Any]:
    """The run row plus counts, ``status`` as readers report it (see `_with_live_status`); raises RunNotFound."""
    cur = con.execute(_SUMMARY + " WHERE r.name = ? OR r.run_id = ?", [name_or_id, name_or_id])
    rows = cur.fetchall()
    row = rows[0] if rows else None
    if row is None:
        recent = con.execute("SELECT name FROM runs ORDER BY created_at DESC LIMIT ?", [_RECENT_RUNS]).fetchall()
        names = [r[0] for r in recent]
        hint = f" (recent runs: {', '.join(names)})" if names else " (the store has no runs yet)"
        raise RunNotFound(f"no run named {name_or_id!r} in this store{hint}; `nbbatch runs` lists them")
    return _with_live_status(con, [_row_dict(cur, row)])[0]


def find_run(con: duckdb.DuckDBPyConnection, name_or_id: str) -> str:
    """The run id of a name or id."""
    return str(run_summary(con, name_or_id)["run_id"])


def list_runs(con: duckdb.DuckDBPyConnection, limit: int | None = None) -> list[dict[str, Any]]:
    """Summaries of every run, newest first."""
    query = _SUMMARY + " ORDER BY r.created_at DESC" + (" LIMIT ?" if limit else "")
    cur = con.execute(query, [limit] if limit else [])
    return _with_live_status(con, [_row_dict(cur, row) for row in cur.fetchall()])


def outputs_sql(con: duckdb.DuckDBPyConnection, run_id: str) -> str:
    """SQL for one row per stored sample, unordered: committed segments and inline rows together."""
    table = outputs_table_name(run_id)
    exists = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [table]
    ).fetchall()
    path = store_path(con)
    parts = [segments.view_sql(con, run_id, path) if path else None]
    parts.append(f"SELECT * FROM {ident(table)}" if exists[0][0] else None)
    present = [p for p in parts if p is not None]
    if not present:  # no rows yet: the key columns alone, typed as an outputs table has them
        keys_sql = ", ".join(f"NULL::{type_name(con, c.type)} AS {ident(c.name)}" for c in OUTPUT_KEYS)
        return f"SELECT {keys_sql} WHERE false"
    return " UNION ALL BY NAME ".join(f"({p})" if len(present) > 1 else p for p in present)


def outputs_relation(con: duckdb.DuckDBPyConnection, run_id: str) -> duckdb.DuckDBPyRelation:
    """One row per stored sample, in dataset order (segments written by workers and inline rows alike)."""
    return con.sql(f"SELECT * FROM ({outputs_sql(con, run_id)}) ORDER BY sample_index")


def metrics_relation(con: duckdb.DuckDBPyConnection, run_id: str) -> duckdb.DuckDBPyRelation:
    """Reported metrics, long format."""
    return con.sql("SELECT * FROM metrics WHERE run_id = $run_id ORDER BY reported_at", params={"run_id": run_id})


def errors_relation(con: duckdb.DuckDBPyConnection, run_id: str) -> duckdb.DuckDBPyRelation:
    """Recorded failures, oldest first."""
    return con.sql("SELECT * FROM errors WHERE run_id = $run_id ORDER BY occurred_at", params={"run_id": run_id})


class RecordedError(NamedTuple):
    """One row of the ``errors`` table, as front ends show it."""

    rank: int | None
    batch_idx: int | None  # None: outside a batch
    indices: list[int] | None
    exc_type: str
    message: str
    traceback: str | None


def latest_errors(
    con: duckdb.DuckDBPyConnection, run_id: str, limit: int, *, current_attempt: bool = False
) -> list[RecordedError]:
    """The run's ``limit`` most recent errors, newest first; with ``current_attempt``, of its latest attempt only."""
    attempt = " AND attempt = (SELECT attempt FROM runs WHERE run_id = $run_id)" if current_attempt else ""
    rows = con.execute(
        "SELECT rank, batch_idx, indices, exc_type, message, traceback FROM errors WHERE run_id = $run_id"
        + attempt + " ORDER BY occurred_at DESC LIMIT $limit",
        {"run_id": run_id, "limit": limit},
    ).fetchall()
    return [RecordedError(*row) for row in rows]


def error_counts(con: duckdb.DuckDBPyConnection, run_id: str) -> list[tuple[str, int]]:
    """``(exc_type, count)`` of the run's recorded errors, most frequent first."""
    rows = con.execute(
        "SELECT exc_type, count(*) FROM errors WHERE run_id = ? GROUP BY exc_type ORDER BY 2 DESC", [run_id]
    ).fetchall()
    return [(str(t), int(n)) for t, n in rows]
