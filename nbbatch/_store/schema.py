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
``signatures``     HMAC signatures of the records that lead to code (launch info, reducer
                   states), keyed by (run_id, kind, key); see ``_store/trust.py``.
``progress``       live per-worker counters, upserted about once a second (not exactly-once).
``progress_log``   a time series of overall progress, for throughput plots.
``segments``       the manifest of committed output segments: one Parquet file per (attempt, rank,
                   checkpoint step) that a worker wrote itself, with rows, bytes and checksum; a file
                   no row names is invisible (``segments.py``).
``segment_columns`` the output columns stored in a run's segments, with their DuckDB types, so the
                   outputs view reads them back as they were (``FLOAT[512]``, not ``FLOAT[]``).
``run_inputs``     a `TableDataset` run's inputs: source, row count, content hash, columns; the
                   rows themselves are a Parquet snapshot beside the store (``inputs.py``).

Also the rule for run names: they end up in command lines and messages, so only a safe set is
allowed (output folders are named by run id). Output keys may be any string (see ``sql.ident``).
Must not import anything from nbbatch but ``_events`` and ``_errors``.
"""

from __future__ import annotations

import os
import re

from nbbatch._errors import InvalidRunName

__all__ = [
    "DDL",
    "KEY_COLUMNS",
    "RUN_NAME_RULE",
    "SCHEMA_VERSION",
    "check_run_name",
    "outputs_folder",
    "outputs_table",
    "run_folder",
]

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
CREATE TABLE IF NOT EXISTS signatures (
    run_id VARCHAR NOT NULL,
    kind VARCHAR NOT NULL,
    key VARCHAR NOT NULL,
    signature VARCHAR NOT NULL,
    key_id VARCHAR,
    PRIMARY KEY (run_id, kind, key)
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
CREATE TABLE IF NOT EXISTS segments (
    run_id VARCHAR NOT NULL,
    file VARCHAR NOT NULL,
    attempt INTEGER,
    rank INTEGER,
    step BIGINT,
    rows BIGINT,
    bytes BIGINT,
    checksum VARCHAR,
    first_batch BIGINT,
    last_batch BIGINT,
    committed_at TIMESTAMP,
    PRIMARY KEY (run_id, file)
);
CREATE TABLE IF NOT EXISTS segment_columns (
    run_id VARCHAR NOT NULL,
    position INTEGER,
    name VARCHAR NOT NULL,
    type VARCHAR NOT NULL,
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS run_inputs (
    run_id VARCHAR PRIMARY KEY,
    source VARCHAR,
    rows BIGINT,
    content_hash VARCHAR,
    columns JSON,
    snapshot_at TIMESTAMP
);
"""


def _run_id(run_id: str) -> str:
    """Run ids are hex; anything else (a store from elsewhere) never reaches a table name or path."""
    if not (run_id.isascii() and run_id.isalnum()):
        raise ValueError(f"invalid run id {run_id!r}: run ids are ASCII letters and digits")
    return run_id


def outputs_table(run_id: str) -> str:
    """Name of a run's outputs table (unquoted; SQL text gets it through `sql.ident`)."""
    return f"outputs_{_run_id(run_id)}"


RUN_NAME_RULE = "letters, digits and `._-`, not starting with `-` or `.`"
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a safe run name, else raise `InvalidRunName` giving the rule.

    Names appear in command lines, logs and URLs, so only a safe set is allowed.

    Example:
        >>> check_run_name("nightly-2024.01_a")
        'nightly-2024.01_a'
    """
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise InvalidRunName(
            f"a run name must be {RUN_NAME_RULE}, got {name!r}; choose a name such as `nightly-2024.01`"
        )
    return name



def outputs_folder(store: str) -> str:
    """``<store's folder>/<store's file stem>_outputs``: runs write their files below it."""
    store = os.path.abspath(store)
    return os.path.join(os.path.dirname(store), os.path.splitext(os.path.basename(store))[0] + "_outputs")


def run_folder(root: str, run_id: str, stored: str | None = None) -> str:
    """A run's folder of files: ``stored`` (a run's ``output_dir``) if it lies inside ``root``, else
    ``<root>/<run_id>``. Folders are named by id, so no run name becomes a path; older runs named
    theirs by a safe name, and a path planted in a store from elsewhere is not written to."""
    if stored:
        real, top = os.path.realpath(stored), os.path.realpath(root)
        if real != top and os.path.commonpath([real, top]) == top:
            return stored
    return os.path.join(root, _run_id(run_id))
