"""Output segments on the store's side: the manifest, the view over committed segments, orphans, compaction.

Workers write each checkpoint step's outputs as one Parquet file in ``<run folder>/segments/``
(``_worker/segments.py``). The launcher's transaction for the step inserts the segment's manifest
row (``segments`` table) and the types of new columns (``segment_columns``) next to the step's
done marks, so a segment is visible exactly when its batches are done. Readers build the outputs
view from the manifest alone: paths come from the store's own location, the run id and file names
that match ``_rows.segment_name`` (never from a path stored in the store), and every column is
cast back to the type DuckDB gave it on ingest (Parquet keeps ``FLOAT[512]`` only as ``FLOAT[]``).
A resumed run first deletes every file in its folder that no committed row names (`sweep`).
Must not import anything from nbbatch but ``_store``, ``_rows``, ``_events`` and ``_errors``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
import zlib
from collections.abc import Sequence

import duckdb
import pyarrow as pa

from nbbatch._errors import StoreError
from nbbatch._events import SegmentWritten
from nbbatch._rows import SEGMENT_FOLDER, is_segment_name, marker_name, segment_name
from nbbatch._store.columns import case_clash, output_columns
from nbbatch._store.arrow import timestamp
from nbbatch._store.schema import (
    KEY_COLUMNS,
    SEGMENT_COLUMNS,
    SEGMENTS,
    insert_sql,
    outputs_folder,
    outputs_table_name,
    run_folder,
)
from nbbatch._store.sql import ident, literal, type_name

__all__ = [
    "INLINE_BYTES", "columns", "compact", "files", "folder", "inline_bytes", "prepare", "record", "sweep", "view_sql",
]

#: Batches whose outputs hold fewer bytes stay inline (pipe -> launcher -> DuckDB insert). Measured in
#: benchmarks/README.md ("Outputs at the speed of the disk"); ``NBBATCH_SEGMENTS=0`` keeps every
#: output inline, ``=1`` puts every one in segments.
INLINE_BYTES = 64 * 1024

_VIEW = "_nbbatch_segment_schema"
_NULL = "NULL"


def folder(output_dir: str) -> str:
    """The segment folder of a run whose files live in ``output_dir``."""
    return os.path.join(output_dir, SEGMENT_FOLDER)


def inline_bytes() -> int | None:
    """This launch's threshold from ``NBBATCH_SEGMENTS``: None turns segments off."""
    mode = os.environ.get("NBBATCH_SEGMENTS", "").strip()
    if mode == "0":
        return None
    return 0 if mode == "1" else INLINE_BYTES


def prepare(output_dir: str, attempt: int) -> None:
    """Create the segment folder and the attempt's marker, which tells workers to write segments there."""
    threshold = inline_bytes()
    if threshold is None:
        return
    where = folder(output_dir)
    try:
        os.makedirs(where, exist_ok=True)
        with open(os.path.join(where, marker_name(attempt)), "w", encoding="utf-8") as handle:
            json.dump({"inline_bytes": threshold}, handle)
    except OSError:  # no segments then: outputs travel inline, as before
        return


def files(con: duckdb.DuckDBPyConnection, run_id: str) -> list[str]:
    """The committed segment files of a run (names), in commit order."""
    rows = con.execute(
        "SELECT file FROM segments WHERE run_id = ? ORDER BY committed_at, step, rank", [run_id]
    ).fetchall()
    return [str(r[0]) for r in rows]


def sweep(con: duckdb.DuckDBPyConnection, run_id: str, output_dir: str) -> list[str]:
    """Delete the run's segment files that no committed manifest names (orphans of a crash); return them."""
    where = folder(output_dir)
    try:
        names = os.listdir(where)
    except OSError:
        return []
    keep = set(files(con, run_id))
    gone = []
    for name in names:
        ours = name.startswith("seg-") or (name.startswith("attempt-") and name.endswith(".json"))
        if ours and name not in keep:
            try:
                os.unlink(os.path.join(where, name))
                gone.append(name)
            except OSError:
                pass
    return gone


def columns(con: duckdb.DuckDBPyConnection, run_id: str) -> list[tuple[str, str]]:
    """``(name, DuckDB type)`` of the run's segment columns, in first-seen order."""
    rows = con.execute(
        "SELECT name, type FROM segment_columns WHERE run_id = ? ORDER BY position", [run_id]
    ).fetchall()
    return [(str(n), str(t)) for n, t in rows]


def _types(con: duckdb.DuckDBPyConnection, schema: bytes) -> list[tuple[str, str]]:
    """DuckDB's types for an Arrow schema: what an inline insert of the same rows would have created."""
    empty = pa.ipc.read_schema(pa.py_buffer(schema)).empty_table()
    con.register(_VIEW, empty)
    described = con.execute(f"DESCRIBE {ident(_VIEW)}").fetchall()
    con.unregister(_VIEW)
    return [(str(r[0]), str(r[1])) for r in described if r[0] not in KEY_COLUMNS]


def record(con: duckdb.DuckDBPyConnection, run_id: str, attempt: int, written: Sequence[SegmentWritten],
           now: dt.datetime | None) -> None:
    """Insert the manifest rows and new column types (inside the step's transaction).

    Raises:
        StoreError: a file name that is not a segment name, a key equal to another ignoring case,
            or a column whose type changed between segments.
    """
    stored = dict(columns(con, run_id))
    position = len(stored)
    seen_schemas: set[bytes] = set()
    for seg in written:
        if not is_segment_name(seg.file):
            raise StoreError(f"a worker reported the segment file {seg.file!r}, which is not a segment name")
        if seg.schema in seen_schemas:
            continue
        seen_schemas.add(seg.schema)
        for name, kind in _types(con, seg.schema):
            have = stored.get(name)
            if have is None:
                clash = case_clash([name], [*stored, *output_columns(con, run_id)])
                if clash is not None:
                    raise StoreError(
                        f"output key {clash[0]!r} equals the column {clash[1]!r} ignoring case (two workers returned "
                        f"both spellings); DuckDB column names ignore case, so return one spelling from "
                        f"`process_batch` and resume the run with the same `run_name`"
                    )
                con.execute(insert_sql(SEGMENT_COLUMNS), [run_id, position, name, kind])
                stored[name], position = kind, position + 1
            elif have == _NULL and kind != _NULL:  # a key that was None so far: its first real type wins
                con.execute("UPDATE segment_columns SET type = ? WHERE run_id = ? AND name = ?", [kind, run_id, name])
                stored[name] = kind
            elif have != kind and kind != _NULL:
                raise StoreError(
                    f"an output column changed type between batches (column {name!r} was {have}, now {kind}); return "
                    f"the same keys, dtypes and per-sample shapes from every `process_batch` call (pad, or return "
                    f"Python lists for ragged values)"
                )
    con.executemany(
        insert_sql(SEGMENTS),
        [[run_id, s.file, attempt, s.rank, s.step, s.rows, s.nbytes, s.checksum, min(s.global_batches, default=None),
          max(s.global_batches, default=None), now] for s in written],
    )


def view_sql(con: duckdb.DuckDBPyConnection, run_id: str, store: str) -> str | None:
    """SQL over the run's committed segments, columns typed as on ingest; None without segments.

    Raises:
        StoreError: a committed segment file is missing (moved or deleted by hand).
    """
    names = files(con, run_id)
    if not names:
        return None
    row = con.execute("SELECT output_dir FROM runs WHERE run_id = ?", [run_id]).fetchone()
    where = folder(run_folder(outputs_folder(store), run_id, str(row[0]) if row and row[0] else None))
    paths = []
    for name in names:
        path = os.path.join(where, name)
        if not is_segment_name(name) or not os.path.isfile(path):
            raise StoreError(
                f"the output segment `{path}` of run {run_id} is missing; committed outputs live in "
                f"`{where}` next to the store: put the file back, or copy the store together with its "
                f"`*_outputs` folder"
            )
        paths.append(literal(path))
    select = [ident(k) for k in KEY_COLUMNS]
    for name, kind in columns(con, run_id):
        cast = ident(name) if kind == _NULL else f"CAST({ident(name)} AS {type_name(con, kind)})"
        select.append(f"{cast} AS {ident(name)}")
    return f"SELECT {', '.join(select)} FROM read_parquet([{', '.join(paths)}], union_by_name = true)"



def compact(con: duckdb.DuckDBPyConnection, run_id: str, store: str, *, into_table: bool = False) -> tuple[int, int]:
    """Merge a run's committed segments into one segment file, or into the store's outputs table.

    Crash-safe in the same way as a run: the new file is complete before one transaction swaps the
    manifest, and the old files are deleted only after it committed (a crash in between leaves
    orphans, which `sweep` deletes). Returns ``(segments merged, rows)``.

    Raises:
        StoreError: a committed segment file is missing, or its bytes do not match its checksum.
    """
    source = view_sql(con, run_id, store)
    if source is None:
        return 0, 0
    old = files(con, run_id)
    row = con.execute("SELECT output_dir FROM runs WHERE run_id = ?", [run_id]).fetchone()
    where = folder(run_folder(outputs_folder(store), run_id, str(row[0]) if row and row[0] else None))
    _verify(con, run_id, where)
    rows = int(con.execute(f"SELECT count(*) FROM ({source})").fetchall()[0][0])
    con.execute("BEGIN TRANSACTION")
    try:
        if into_table:
            _into_table(con, run_id, source)
        else:
            _into_file(con, run_id, source, where, rows)
        con.execute("DELETE FROM segments WHERE run_id = ? AND file IN (SELECT unnest(?::VARCHAR[]))", [run_id, old])
        if into_table:
            con.execute("DELETE FROM segment_columns WHERE run_id = ?", [run_id])
        con.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(duckdb.Error):
            con.execute("ROLLBACK")
        raise
    for name in old:
        with contextlib.suppress(OSError):
            os.unlink(os.path.join(where, name))
    return len(old), rows


def _verify(con: duckdb.DuckDBPyConnection, run_id: str, where: str) -> None:
    """Check every committed segment against its manifest checksum before its rows are moved."""
    for name, checksum in con.execute("SELECT file, checksum FROM segments WHERE run_id = ?", [run_id]).fetchall():
        with open(os.path.join(where, str(name)), "rb") as handle:
            actual = f"crc32:{zlib.crc32(handle.read()):08x}"
        if checksum and actual != checksum:
            raise StoreError(
                f"the output segment `{os.path.join(where, str(name))}` does not match its checksum ({actual}, the "
                f"store says {checksum}): it changed after its commit. Restore it from a copy; nothing was compacted"
            )


def _into_file(con: duckdb.DuckDBPyConnection, run_id: str, source: str, where: str, rows: int) -> None:
    """Write every committed row, in ``sample_index`` order, to one new segment (attempt 0: compacted)."""
    step = int(con.execute("SELECT coalesce(max(step), 0) FROM segments WHERE run_id = ?", [run_id]).fetchall()[0][0])
    name = segment_name(run_id, 0, 0, step)
    final = os.path.join(where, name)
    if final in {os.path.join(where, f) for f in files(con, run_id)}:
        name = segment_name(run_id, 0, 0, step + 1)
        final = os.path.join(where, name)
    partial = final + ".partial"
    copy = f"COPY (SELECT * FROM ({source}) ORDER BY sample_index)"  # sql: `source` is `view_sql`'s query
    con.execute(f"{copy} TO {literal(partial)} (FORMAT parquet)")
    with open(partial, "rb") as handle:
        data = handle.read()
    os.replace(partial, final)
    row = {"run_id": run_id, "file": name, "attempt": 0, "rank": 0, "step": step, "rows": rows, "bytes": len(data),
           "checksum": f"crc32:{zlib.crc32(data):08x}", "committed_at": timestamp(time.time())}
    con.execute(insert_sql(SEGMENTS, row), list(row.values()))


def _into_table(con: duckdb.DuckDBPyConnection, run_id: str, source: str) -> None:
    """Append every committed segment row to the run's inline outputs table (created if need be)."""
    table = ident(outputs_table_name(run_id))
    if output_columns(con, run_id):
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM ({source}) ORDER BY sample_index")  # sql: view_sql
    else:
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM ({source}) ORDER BY sample_index")  # sql: view_sql
