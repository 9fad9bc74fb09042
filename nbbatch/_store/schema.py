"""Tables of the store and their DDL; the one place the schema is written down.

One DuckDB file holds every run. Tables (all keyed by ``run_id``):

``runs``           one row per run: name, status, fingerprint, plan, config, reduced metrics.
``batches``        one row per committed global batch: the exactly-once "done" mark plus engine
                   stats (rank, batch_idx, rows, seconds). Primary key ``(run_id, global_batch)``.
``outputs_<id>``   one table per run, one row per sample: ``run_id, rank, batch_idx,
                   global_batch, sample_index`` then one column per key ``process_batch`` returned.
                   Vectors are DuckDB ``ARRAY`` columns (``FLOAT[8]``), ragged lists ``LIST``.
``metrics``        ``report_metrics`` values, long format, tied to the batch they were reported in.
``errors``         failures with traceback and dataset indices (skipped and fatal).
``reducer_state``  the last committed ``per_slot_reduce()`` of each (attempt, rank).
``progress``       live per-worker counters, upserted about once a second (not exactly-once).
``progress_log``   a time series of overall progress, for throughput plots.

Must not import anything from nbbatch but ``_events``.
"""

from __future__ import annotations

__all__ = ["SCHEMA_VERSION", "DDL", "KEY_COLUMNS", "outputs_table"]

SCHEMA_VERSION = "1"

#: Columns every outputs row starts with, in order.
KEY_COLUMNS = ("run_id", "rank", "batch_idx", "global_batch", "sample_index")

DDL = """
CREATE TABLE IF NOT EXISTS nbbatch_meta (
    key VARCHAR PRIMARY KEY,
    value VARCHAR
);
CREATE TABLE IF NOT EXISTS runs (
    run_id VARCHAR PRIMARY KEY,
    name VARCHAR NOT NULL UNIQUE,
    status VARCHAR NOT NULL,
    processor VARCHAR,
    dataset_len BIGINT,
    batch_size INTEGER,
    max_batches INTEGER,
    checkpoint_interval INTEGER,
    planned_batches BIGINT,
    real_batches BIGINT,
    world_size INTEGER,
    attempt INTEGER,
    done_at_start BIGINT,
    on_error VARCHAR,
    max_failures INTEGER,
    output_dir VARCHAR,
    launch JSON,
    config JSON,
    reduced_metrics JSON,
    error VARCHAR,
    host VARCHAR,
    pid INTEGER,
    created_at TIMESTAMP,
    started_at TIMESTAMP,
    updated_at TIMESTAMP,
    finished_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS batches (
    run_id VARCHAR NOT NULL,
    global_batch BIGINT NOT NULL,
    rank INTEGER,
    batch_idx BIGINT,
    attempt INTEGER,
    rows BIGINT,
    first_index BIGINT,
    started_at TIMESTAMP,
    seconds DOUBLE,
    committed_at TIMESTAMP,
    PRIMARY KEY (run_id, global_batch)
);
CREATE TABLE IF NOT EXISTS metrics (
    run_id VARCHAR NOT NULL,
    rank INTEGER,
    global_batch BIGINT,
    batch_idx BIGINT,
    "group" VARCHAR,
    steps_completed BIGINT,
    name VARCHAR,
    value DOUBLE,
    value_json VARCHAR,
    reported_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS errors (
    run_id VARCHAR NOT NULL,
    attempt INTEGER,
    rank INTEGER,
    global_batch BIGINT,
    batch_idx BIGINT,
    indices BIGINT[],
    exc_type VARCHAR,
    message VARCHAR,
    traceback VARCHAR,
    fatal BOOLEAN,
    occurred_at TIMESTAMP
);
CREATE TABLE IF NOT EXISTS reducer_state (
    run_id VARCHAR NOT NULL,
    attempt INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    step BIGINT,
    states BLOB,
    PRIMARY KEY (run_id, attempt, rank)
);
CREATE TABLE IF NOT EXISTS progress (
    run_id VARCHAR NOT NULL,
    attempt INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    batches BIGINT,
    rows BIGINT,
    failed BIGINT,
    todo BIGINT,
    current_batch BIGINT,
    status VARCHAR,
    updated_at TIMESTAMP,
    PRIMARY KEY (run_id, attempt, rank)
);
CREATE TABLE IF NOT EXISTS progress_log (
    run_id VARCHAR NOT NULL,
    attempt INTEGER,
    ts TIMESTAMP,
    batches BIGINT,
    rows BIGINT,
    committed BIGINT
);
"""


def outputs_table(run_id: str) -> str:
    """Name of a run's outputs table; run ids are hex, so the name is safe to splice into SQL."""
    if not run_id.isalnum():
        raise ValueError(f"invalid run id {run_id!r}")
    return f"outputs_{run_id}"
