"""One flush's rows, written inside the writer's open transaction: batches, outputs, metrics, errors,
reducer states, live progress and the progress log.

Every table gets its rows as one Arrow table typed by its column list (``schema.py``), inserted
``BY NAME``; the caller (``StoreWriter.commit``) owns the transaction, so a failure here rolls the
whole flush back. Must not import anything from nbbatch but ``_events``, ``_errors`` and ``_store``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any

import duckdb

from nbbatch._store import segments
from nbbatch._store.arrow import jsonable, outputs_table, rows_table, timestamp
from nbbatch._store.columns import insert_outputs
from nbbatch._store.records import Commit, CommittedBatch, MetricRow, ProgressRow, RunRecord
from nbbatch._store.schema import BATCHES, ERRORS, METRICS, PROGRESS, PROGRESS_LOG, Table, insert_sql
from nbbatch._store.sql import ident
from nbbatch._store.trust import Signer

__all__ = ["metric_rows", "write"]

_VIEW = "_nbbatch_rows"


def write(con: duckdb.DuckDBPyConnection, record: RunRecord, commit: Commit, now: float, signer: Signer) -> None:
    """Insert every part of ``commit`` (the caller holds the transaction); ``now`` stamps the rows."""
    run_id, attempt = record.run_id, record.attempt
    if commit.batches:
        _batches(con, record, commit.batches, now)
    if commit.segments:
        segments.record(con, run_id, attempt, commit.segments, timestamp(now))
    if commit.metrics:
        _insert(con, METRICS, list(metric_rows(run_id, commit.metrics)))
    if commit.errors:
        _insert(con, ERRORS, [
            {"run_id": run_id, "attempt": attempt, "rank": e.rank, "global_batch": e.global_batch,
             "batch_idx": e.batch_idx, "indices": list(e.indices), "exc_type": e.exc_type, "message": e.message,
             "traceback": e.traceback, "fatal": e.fatal, "occurred_at": timestamp(e.t)}
            for e in commit.errors
        ])
    for rank, reduced in sorted(commit.reducer_states.items()):
        signer.put_states(con, run_id, attempt, rank, reduced)
    if commit.progress:
        _progress(con, record, commit.progress, now)
    if commit.log is not None:
        log = commit.log
        row = {"run_id": run_id, "attempt": attempt, "ts": timestamp(log.t), "batches": log.done, "rows": log.rows,
               "committed": log.committed}
        con.execute(insert_sql(PROGRESS_LOG, row), list(row.values()))


def _batches(con: duckdb.DuckDBPyConnection, record: RunRecord, batches: list[CommittedBatch], now: float) -> None:
    """The done marks, then the outputs that travelled inline (the rest are in segments)."""
    _insert(con, BATCHES, [
        {"run_id": record.run_id, "global_batch": c.batch.global_batch, "rank": c.batch.rank,
         "batch_idx": c.batch.batch_idx, "attempt": record.attempt, "rows": c.batch.rows, "first_index": c.first_index,
         "started_at": timestamp(c.batch.started_at), "seconds": c.batch.seconds, "committed_at": timestamp(now)}
        for c in batches
    ])
    with_outputs = [
        (c.batch.rank, c.batch.batch_idx, c.batch.global_batch, c.first_index, c.batch.outputs)
        for c in batches if c.batch.outputs
    ]
    if with_outputs:
        insert_outputs(con, record.run_id, outputs_table(record.run_id, with_outputs))


def _progress(con: duckdb.DuckDBPyConnection, record: RunRecord, progress: list[ProgressRow], now: float) -> None:
    """Upsert each worker's live counters (one row per run, attempt and rank)."""
    _insert(con, PROGRESS, [
        {"run_id": record.run_id, "attempt": record.attempt, "rank": p.rank, "batches": p.batches, "rows": p.rows,
         "failed": p.failed, "todo": p.todo, "current_batch": p.current_batch, "status": p.status,
         "updated_at": timestamp(now)}
        for p in progress
    ], replace=True)


def _insert(con: duckdb.DuckDBPyConnection, table: Table, rows: list[dict[str, Any]], replace: bool = False) -> None:
    con.register(_VIEW, rows_table(rows, table))
    # No `finally`: after a failed insert the transaction is aborted, so unregistering would
    # raise and hide the real error (e.g. a type mismatch); the caller's ROLLBACK drops the view.
    verb = "INSERT OR REPLACE INTO" if replace else "INSERT INTO"
    con.execute(f"{verb} {ident(table.name)} BY NAME SELECT * FROM {ident(_VIEW)}")
    con.unregister(_VIEW)


def metric_rows(run_id: str, metrics: Iterable[MetricRow]) -> Iterator[dict[str, Any]]:
    """``metrics`` table rows: one per reported name, numbers in ``value``, anything else as JSON."""
    for m in metrics:
        for name, value in m.record.metrics:
            number, text = _metric_value(value)
            yield {
                "run_id": run_id, "rank": m.rank, "global_batch": m.global_batch, "batch_idx": m.batch_idx,
                "group": m.record.group, "steps_completed": m.record.steps_completed, "name": name, "value": number,
                "value_json": text, "reported_at": timestamp(m.record.reported_at),
            }


def _metric_value(value: Any) -> tuple[float | None, str | None]:
    if hasattr(value, "item") and callable(value.item):
        try:
            value = value.item()
        except (ValueError, RuntimeError):
            pass
    if isinstance(value, bool):
        return float(value), None
    if isinstance(value, (int, float)):
        return float(value), None
    return None, json.dumps(jsonable(value))
