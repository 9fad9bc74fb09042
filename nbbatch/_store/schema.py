"""Tables of the store: each table's columns written down once, its DDL and INSERT text derived.

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

Each table is a `Table` of `Column` s (name, DuckDB type, constraint). The DDL (`DDL`), the Arrow
schemas of bulk inserts (``arrow.py``, by `DuckType`), the column lists of INSERTs (`insert_sql`)
and the reader's run columns all come from these lists; nothing else spells a column list out.

The rule for run names lives with the run options (``_options``) and is re-exported here: names
end up in command lines and messages, so only a safe set is allowed (output folders are named by
run id). Output keys may be any string (see ``sql.ident``).
Must not import anything from nbbatch but ``_errors``, ``_options`` and ``_store.sql``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from nbbatch._options import RUN_NAME_RULE, check_run_name
from nbbatch._store.sql import ident

__all__ = [
    "BATCHES",
    "Column",
    "DDL",
    "DuckType",
    "ERRORS",
    "KEY_COLUMNS",
    "METRICS",
    "NBBATCH_META",
    "OUTPUT_KEYS",
    "PROGRESS",
    "PROGRESS_LOG",
    "REDUCER_STATE",
    "RUNS",
    "RUN_INPUTS",
    "RUN_NAME_RULE",
    "SCHEMA_VERSION",
    "SEGMENTS",
    "SEGMENT_COLUMNS",
    "SIGNATURES",
    "TABLES",
    "Table",
    "check_run_name",
    "insert_sql",
    "outputs_folder",
    "outputs_table_name",
    "run_folder",
]

SCHEMA_VERSION = "1"

#: The DuckDB types the store's own tables use (``arrow.py`` maps each to its Arrow type).
DuckType = Literal["VARCHAR", "JSON", "BLOB", "BOOLEAN", "INTEGER", "BIGINT", "BIGINT[]", "DOUBLE", "TIMESTAMP"]


@dataclass(frozen=True)
class Column:
    """One column of a store table.

    Attributes:
        name: the column name (quoted by `sql.ident` wherever it reaches SQL text).
        type: its DuckDB type.
        constraint: column constraints as DDL text (``NOT NULL``, ``PRIMARY KEY``), or empty.
    """

    name: str
    type: DuckType
    constraint: str = ""

    @property
    def sql(self) -> str:
        """The column's definition in ``CREATE TABLE``."""
        return f"{ident(self.name)} {self.type} {self.constraint}".rstrip()


@dataclass(frozen=True)
class Table:
    """One store table: its name, its columns in order, and its primary key (if not on one column)."""

    name: str
    columns: tuple[Column, ...]
    primary_key: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """The column names, in order."""
        return tuple(c.name for c in self.columns)

    @property
    def create_sql(self) -> str:
        """``CREATE TABLE IF NOT EXISTS`` for this table."""
        parts = [c.sql for c in self.columns]
        if self.primary_key:
            parts.append(f"PRIMARY KEY ({', '.join(ident(k) for k in self.primary_key)})")
        body_sql = ",\n    ".join(parts)
        return f"CREATE TABLE IF NOT EXISTS {ident(self.name)} (\n    {body_sql}\n);"


def _table(name: str, *columns: tuple[str, DuckType] | tuple[str, DuckType, str], key: tuple[str, ...] = ()) -> Table:
    return Table(name, tuple(Column(*c) for c in columns), key)


NBBATCH_META = _table("nbbatch_meta", ("key", "VARCHAR", "PRIMARY KEY"), ("value", "VARCHAR"))
RUNS = _table(
    "runs",
    ("run_id", "VARCHAR", "PRIMARY KEY"),
    ("name", "VARCHAR", "NOT NULL UNIQUE"),
    ("status", "VARCHAR", "NOT NULL"),
    ("processor", "VARCHAR"),
    ("dataset_len", "BIGINT"),
    ("batch_size", "INTEGER"),
    ("max_batches", "INTEGER"),
    ("checkpoint_interval", "INTEGER"),
    ("planned_batches", "BIGINT"),
    ("real_batches", "BIGINT"),
    ("world_size", "INTEGER"),
    ("attempt", "INTEGER"),
    ("done_at_start", "BIGINT"),
    ("on_error", "VARCHAR"),
    ("max_failures", "INTEGER"),
    ("output_dir", "VARCHAR"),
    ("launch", "JSON"),
    ("config", "JSON"),  # the call's other options (`RunSpec.config` less the keys that are columns here)
    ("reduced_metrics", "JSON"),
    ("error", "VARCHAR"),
    ("host", "VARCHAR"),
    ("pid", "INTEGER"),
    ("created_at", "TIMESTAMP"),
    ("started_at", "TIMESTAMP"),
    ("updated_at", "TIMESTAMP"),
    ("finished_at", "TIMESTAMP"),
)
BATCHES = _table(
    "batches",
    ("run_id", "VARCHAR", "NOT NULL"),
    ("global_batch", "BIGINT", "NOT NULL"),
    ("rank", "INTEGER"),
    ("batch_idx", "BIGINT"),
    ("attempt", "INTEGER"),
    ("rows", "BIGINT"),
    ("first_index", "BIGINT"),
    ("started_at", "TIMESTAMP"),
    ("seconds", "DOUBLE"),
    ("committed_at", "TIMESTAMP"),
    key=("run_id", "global_batch"),
)
METRICS = _table(
    "metrics",
    ("run_id", "VARCHAR", "NOT NULL"),
    ("rank", "INTEGER"),
    ("global_batch", "BIGINT"),
    ("batch_idx", "BIGINT"),
    ("group", "VARCHAR"),
    ("steps_completed", "BIGINT"),
    ("name", "VARCHAR"),
    ("value", "DOUBLE"),
    ("value_json", "VARCHAR"),
    ("reported_at", "TIMESTAMP"),
)
ERRORS = _table(
    "errors",
    ("run_id", "VARCHAR", "NOT NULL"),
    ("attempt", "INTEGER"),
    ("rank", "INTEGER"),
    ("global_batch", "BIGINT"),
    ("batch_idx", "BIGINT"),
    ("indices", "BIGINT[]"),
    ("exc_type", "VARCHAR"),
    ("message", "VARCHAR"),
    ("traceback", "VARCHAR"),
    ("fatal", "BOOLEAN"),
    ("occurred_at", "TIMESTAMP"),
)
REDUCER_STATE = _table(
    "reducer_state",
    ("run_id", "VARCHAR", "NOT NULL"),
    ("attempt", "INTEGER", "NOT NULL"),
    ("rank", "INTEGER", "NOT NULL"),
    ("step", "BIGINT"),
    ("states", "BLOB"),
    key=("run_id", "attempt", "rank"),
)
SIGNATURES = _table(
    "signatures",
    ("run_id", "VARCHAR", "NOT NULL"),
    ("kind", "VARCHAR", "NOT NULL"),
    ("key", "VARCHAR", "NOT NULL"),
    ("signature", "VARCHAR", "NOT NULL"),
    ("key_id", "VARCHAR"),
    key=("run_id", "kind", "key"),
)
PROGRESS = _table(
    "progress",
    ("run_id", "VARCHAR", "NOT NULL"),
    ("attempt", "INTEGER", "NOT NULL"),
    ("rank", "INTEGER", "NOT NULL"),
    ("batches", "BIGINT"),
    ("rows", "BIGINT"),
    ("failed", "BIGINT"),
    ("todo", "BIGINT"),
    ("current_batch", "BIGINT"),
    ("status", "VARCHAR"),
    ("updated_at", "TIMESTAMP"),
    key=("run_id", "attempt", "rank"),
)
PROGRESS_LOG = _table(
    "progress_log",
    ("run_id", "VARCHAR", "NOT NULL"),
    ("attempt", "INTEGER"),
    ("ts", "TIMESTAMP"),
    ("batches", "BIGINT"),
    ("rows", "BIGINT"),
    ("committed", "BIGINT"),
)
SEGMENTS = _table(
    "segments",
    ("run_id", "VARCHAR", "NOT NULL"),
    ("file", "VARCHAR", "NOT NULL"),
    ("attempt", "INTEGER"),
    ("rank", "INTEGER"),
    ("step", "BIGINT"),
    ("rows", "BIGINT"),
    ("bytes", "BIGINT"),
    ("checksum", "VARCHAR"),
    ("first_batch", "BIGINT"),
    ("last_batch", "BIGINT"),
    ("committed_at", "TIMESTAMP"),
    key=("run_id", "file"),
)
SEGMENT_COLUMNS = _table(
    "segment_columns",
    ("run_id", "VARCHAR", "NOT NULL"),
    ("position", "INTEGER"),
    ("name", "VARCHAR", "NOT NULL"),
    ("type", "VARCHAR", "NOT NULL"),
    key=("run_id", "name"),
)
RUN_INPUTS = _table(
    "run_inputs",
    ("run_id", "VARCHAR", "PRIMARY KEY"),
    ("source", "VARCHAR"),
    ("rows", "BIGINT"),
    ("content_hash", "VARCHAR"),
    ("columns", "JSON"),
    ("snapshot_at", "TIMESTAMP"),
)

TABLES = (NBBATCH_META, RUNS, BATCHES, METRICS, ERRORS, REDUCER_STATE, SIGNATURES, PROGRESS, PROGRESS_LOG, SEGMENTS,
          SEGMENT_COLUMNS, RUN_INPUTS)
DDL = "\n".join(t.create_sql for t in TABLES)

#: The columns every outputs row starts with, in order, and their types (the rest are the run's keys).
OUTPUT_KEYS = (
    Column("run_id", "VARCHAR"), Column("rank", "INTEGER"), Column("batch_idx", "BIGINT"),
    Column("global_batch", "BIGINT"), Column("sample_index", "BIGINT"),
)
KEY_COLUMNS = tuple(c.name for c in OUTPUT_KEYS)


def insert_sql(table: Table, names: Iterable[str] | None = None, *, replace: bool = False) -> str:
    """``INSERT [OR REPLACE] INTO`` ``table`` naming ``names`` (default: every column), one ``?`` each.

    Raises:
        ValueError: a name is not a column of ``table`` (a typo fails here, not as a DuckDB binder error).

    Example:
        >>> insert_sql(PROGRESS_LOG, ["run_id", "ts"])
        'INSERT INTO "progress_log" ("run_id", "ts") VALUES (?, ?)'
    """
    chosen = table.names if names is None else tuple(names)
    unknown = [n for n in chosen if n not in table.names]
    if unknown:
        raise ValueError(f"{unknown} are not columns of the store table {table.name!r} (it has {table.names})")
    columns = ", ".join(ident(n) for n in chosen)
    marks = ", ".join("?" for _ in chosen)
    verb = "INSERT OR REPLACE INTO" if replace else "INSERT INTO"
    return f"{verb} {ident(table.name)} ({columns}) VALUES ({marks})"


def _run_id(run_id: str) -> str:
    """Run ids are hex; anything else (a store from elsewhere) never reaches a table name or path."""
    if not (run_id.isascii() and run_id.isalnum()):
        raise ValueError(f"invalid run id {run_id!r}: run ids are ASCII letters and digits")
    return run_id


def outputs_table_name(run_id: str) -> str:
    """Name of a run's outputs table (unquoted; SQL text gets it through `sql.ident`).

    Not to be confused with ``_rows.outputs_table``, which builds the Arrow rows of such a table.
    """
    return f"outputs_{_run_id(run_id)}"


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
