"""A run's input snapshot: the rows of a `TableDataset`, fixed when the run starts.

The snapshot is a Parquet file in ``<store folder>/<store stem>_inputs/``, named by the content
hash of its rows, with the row number in the column ``_nbbatch_row`` (the ``sample_index`` the
outputs carry). Workers read it instead of the source, so a source changing mid-run changes
nothing, and a file beside the store (not the store itself) lets them read while the launcher
writes the store. The ``run_inputs`` table holds each run's row count, content hash and columns;
`check` compares them when a named run starts again. Readers find the file from the store's own
path and the stored hash (hex), never from a path stored in the store.
Must not import anything from nbbatch but ``_store`` and ``_errors``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
import duckdb

from nbbatch._errors import InvalidDataset, ResumeMismatch, StoreError
from nbbatch._store.schema import KEY_COLUMNS, RUN_INPUTS, insert_sql
from nbbatch._store.sql import ident, literal, type_name

__all__ = [
    "CLASH_PREFIX", "InputsInfo", "ROW_COLUMN", "check", "column_sql", "inputs_sql", "joined_sql", "record",
    "snapshot_path", "stored", "take_snapshot",
]

#: The snapshot's row-number column; views rename it to ``sample_index``.
ROW_COLUMN = "_nbbatch_row"
#: Prefix that input columns get when their name is taken by an output column (repeated if need be).
CLASH_PREFIX = "input_"
# Small row groups: a worker's batch decodes one or two of them, not 120k rows (smaller ones make
# the footer, parsed per query, too long). LZ4 compresses text like snappy and reads about 2x faster.
_ROW_GROUP = 16384
_HEX = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class InputsInfo:
    """What a snapshot holds: the fingerprint part ``inputs`` of a run.

    Attributes:
        source: the `TableDataset` source as given (SQL or a path), for display and resume.
        rows: number of rows.
        content_hash: 32 hex digits over the rows, their order, and the column names and types.
        columns: ``(name, DuckDB type)`` of each input column, in order.
        nulls: NULL count per column, as the snapshot found them (not stored; for checks).
    """

    source: str
    rows: int
    content_hash: str
    columns: tuple[tuple[str, str], ...]
    nulls: tuple[int, ...] = field(default=(), compare=False)


def snapshot_dir(store: str) -> str:
    """``<folder>/<stem>_inputs`` next to the store file ``<folder>/<stem>.duckdb``."""
    store = os.path.abspath(store)
    return os.path.join(os.path.dirname(store), os.path.splitext(os.path.basename(store))[0] + "_inputs")


def snapshot_path(store: str, content_hash: str) -> str:
    """The snapshot file of ``content_hash`` (hex only, so it always lands in `snapshot_dir`)."""
    if not _HEX.fullmatch(content_hash):
        raise ValueError(f"invalid content hash {content_hash!r}")
    return os.path.join(snapshot_dir(store), content_hash + ".parquet")


def take_snapshot(con: duckdb.DuckDBPyConnection, query: str, store: str, source: str) -> InputsInfo:
    """Write the rows of ``query`` (in its order) to a snapshot beside ``store``; return its info.

    One pass: ``row_number() OVER ()`` runs as DuckDB's streaming window, which numbers rows in
    the order they leave the query (an ``ORDER BY`` included), the order ``COPY`` writes them in.
    Then the file is hashed and moved to its content-addressed name.

    Raises:
        InvalidDataset: the query fails, returns no rows, or has a column ``_nbbatch_row``.
    """
    try:
        # The query's own types: Parquet turns ARRAY into LIST, so readers cast back (`column_sql`).
        columns = tuple((str(n), str(t)) for n, t, *_ in con.execute(f"DESCRIBE {query}").fetchall())
    except duckdb.Error as exc:
        raise _failed(exc, source) from exc
    if any(n.casefold() == ROW_COLUMN for n, _ in columns):
        raise InvalidDataset(
            f"the TableDataset query returns a column named `{ROW_COLUMN}`, which nbbatch uses; rename it in the query"
        )
    folder = snapshot_dir(store)
    os.makedirs(folder, exist_ok=True)
    numbered = os.path.join(folder, f".{uuid.uuid4().hex}.tmp.parquet")
    try:
        try:
            con.execute(
                f"COPY (SELECT row_number() OVER () - 1 AS {ROW_COLUMN}, * FROM ({query})) TO {literal(numbered)} "
                f"(FORMAT parquet, ROW_GROUP_SIZE {_ROW_GROUP}, COMPRESSION lz4_raw)"
            )
        except duckdb.Error as exc:
            raise _failed(exc, source) from exc
        # DuckDB's row hash combines fields cheaply (a permutation of rows can keep its XOR), so each
        # row's hash is also weighted by its position: reordered rows change the sum.
        nulls = "".join(f", count(*) - count(s.{ident(n)})" for n, _ in columns)  # same pass: checks need them
        found = con.execute(
            f"SELECT count(*), bit_xor(hash(s)), sum(hash(s)::HUGEINT * (s.{ROW_COLUMN} + 1)){nulls} "
            f"FROM read_parquet({literal(numbered)}) s"
        ).fetchall()[0]
        rows = int(found[0])
        if rows == 0:
            raise InvalidDataset(
                f"the TableDataset source returned no rows: `{source}`; check its WHERE clause, the file's "
                f"contents, or that a glob matches the files you expect"
            )
        digest = hashlib.sha256(json.dumps([rows, columns, str(found[1]), str(found[2])]).encode()).hexdigest()[:32]
        target = snapshot_path(store, digest)
        if os.path.exists(target):
            os.unlink(numbered)  # the same rows are already there (a resume, or another run)
        else:
            os.replace(numbered, target)
        return InputsInfo(source=source, rows=rows, content_hash=digest, columns=columns,
                          nulls=tuple(int(v) for v in found[3:]))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(numbered)


def _failed(exc: BaseException, source: str) -> InvalidDataset:
    return InvalidDataset(
        f"the TableDataset query failed in DuckDB: {str(exc).strip()}\nFix the SQL (try it with `duckdb.sql(...)`) "
        f"or the path in `TableDataset({source!r})`"
    )


def record(con: duckdb.DuckDBPyConnection, run_id: str, info: InputsInfo) -> None:
    """Store a new run's inputs fingerprint (inside the writer's ``begin``)."""
    con.execute(
        insert_sql(RUN_INPUTS, replace=True),
        [run_id, info.source, info.rows, info.content_hash, json.dumps(info.columns),
         time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())],
    )


def stored(con: duckdb.DuckDBPyConnection, run_id: str) -> InputsInfo | None:
    """The inputs fingerprint of ``run_id``, or None when the run was not started on a table."""
    has_table = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = 'run_inputs'"
    ).fetchall()[0][0]
    if not has_table:  # a store written before tables-in existed
        return None
    rows = con.execute(
        "SELECT source, rows, content_hash, columns FROM run_inputs WHERE run_id = ?", [run_id]
    ).fetchall()
    if not rows:
        return None
    source, count, digest, columns = rows[0]
    return InputsInfo(str(source), int(count), str(digest), tuple((str(n), str(t)) for n, t in json.loads(columns)))


def _describe(info: InputsInfo | None) -> str:
    if info is None:
        return "no TableDataset"
    return f"{info.rows} rows, content hash {info.content_hash[:12]}"


def check(con: duckdb.DuckDBPyConnection, run_id: str, name: str, store: str, given: InputsInfo | None) -> None:
    """Refuse to continue run ``name`` on other inputs than it started with (`ResumeMismatch` on ``inputs``)."""
    have = stored(con, run_id)
    if have is None and given is None:
        return
    if have is not None and given is not None and have.content_hash == given.content_hash:
        return
    fix = (
        "restore the source so it returns the same rows, or start a new run with another `run_name`"
        if have is not None else "pass the dataset the run started with, or choose a new `run_name`"
    )
    raise ResumeMismatch(
        f"run {name!r} in `{store}` was started with inputs {_describe(have)}, this call has "
        f"{_describe(given)} (source {given.source if given else None!r}): the source changed since the run "
        f"started. The run's own rows stay in its snapshot; {fix}",
        field="inputs", stored=_describe(have), given=_describe(given),
    )


def _store_file(con: duckdb.DuckDBPyConnection) -> str:
    """The file of the database ``con`` is attached to (the store)."""
    found = con.execute("SELECT path FROM duckdb_databases() WHERE database_name = current_database()").fetchall()
    return str(found[0][0])


def _unique(name: str, taken: set[str]) -> str:
    """``name``, or ``input_name`` (``input_input_name``, ...) while DuckDB would see a clash (case-blind)."""
    while name.casefold() in taken:
        name = CLASH_PREFIX + name
    return name


def column_sql(con: duckdb.DuckDBPyConnection, name: str, dtype: str, prefix: str = "") -> str:
    """A snapshot column as the query typed it: Parquet stores ``FLOAT[16]`` as a list, so cast it back."""
    if dtype.endswith("]") and not dtype.endswith("[]"):
        return f"CAST({prefix}{ident(name)} AS {type_name(con, dtype)})"
    return prefix + ident(name)


def _input_columns(con: duckdb.DuckDBPyConnection, info: InputsInfo, taken: set[str], prefix: str = "") -> list[str]:
    """The snapshot's columns as select items (typed as the query typed them), clashes prefixed ``input_``."""
    taken = taken | {"sample_index"}
    parts = []
    for column, dtype in info.columns:
        alias = _unique(column, taken)
        taken.add(alias.casefold())
        parts.append(f"{column_sql(con, column, dtype, prefix)} AS {ident(alias)}")
    return parts


def _snapshot_file(con: duckdb.DuckDBPyConnection, run_id: str, info: InputsInfo) -> str:
    path = snapshot_path(_store_file(con), info.content_hash)
    if not os.path.exists(path):
        raise StoreError(
            f"the input snapshot of run {run_id} is missing (`{path}`, next to the store); its outputs are "
            f"intact: read them with `outputs()`, or put the snapshot file back"
        )
    return path


def inputs_sql(con: duckdb.DuckDBPyConnection, run_id: str) -> str | None:
    """SQL for the run's inputs (``sample_index`` + input columns), or None for a run without a TableDataset.

    An input column named ``sample_index`` is renamed ``input_sample_index``.
    """
    info = stored(con, run_id)
    if info is None:
        return None
    path = _snapshot_file(con, run_id, info)
    select = [f"{ROW_COLUMN} AS sample_index", *_input_columns(con, info, set())]
    return f"SELECT {', '.join(select)} FROM read_parquet({literal(path)})"


def joined_sql(con: duckdb.DuckDBPyConnection, run_id: str, outputs_sql: str, output_columns: list[str],
               with_keys: bool = False) -> str | None:
    """``outputs_sql`` (SQL over the run's outputs) joined to its input rows, or None without inputs.

    Columns: the engine columns if ``with_keys``, ``sample_index``, the input columns, then the
    processor's output columns; ordered by ``sample_index``. An input column whose name (ignoring
    case) is also an output column of the run, engine columns included, is renamed with the
    prefix ``input_`` (again, until the name is free). Rows without outputs are left out.
    """
    info = stored(con, run_id)
    if info is None:
        return None
    path = _snapshot_file(con, run_id, info)
    keys = [k for k in KEY_COLUMNS if k != "sample_index"]
    select = [f"o.{ident(k)}" for k in keys] if with_keys else []
    select.append(f"i.{ROW_COLUMN} AS sample_index")
    select += _input_columns(con, info, {c.casefold() for c in output_columns}, prefix="i.")
    select += [f"o.{ident(c)}" for c in output_columns if c not in KEY_COLUMNS]
    return (
        f"SELECT {', '.join(select)} FROM ({outputs_sql}) o JOIN read_parquet({literal(path)}) i "
        f"ON o.sample_index = i.{ROW_COLUMN} ORDER BY i.{ROW_COLUMN}"
    )
