"""A run's outputs table: creating it, adding the columns of new keys, listing its columns.

Output keys are user data: they reach SQL text only through `sql.ident`. DuckDB matches
identifiers ignoring case, so two keys that differ only in case would be one column (or, inside
one Arrow scan, get renamed ``X_1``); workers refuse such keys per batch, and this module refuses
them again at commit time for the one case a worker cannot see (two workers first returning
``x`` and ``X`` in the same flush). Must not import anything from nbbatch but ``_store`` and
``_errors``.
"""

from __future__ import annotations

import duckdb
import pyarrow as pa

from nbbatch._errors import StoreError
from nbbatch._store.schema import KEY_COLUMNS, outputs_table_name
from nbbatch._store.sql import ident, type_name

__all__ = ["case_clash", "insert_outputs", "output_columns"]

_VIEW = "_nbbatch_out"


def output_columns(con: duckdb.DuckDBPyConnection, run_id: str) -> tuple[str, ...]:
    """The columns of the run's outputs table (key columns included), or () before its first rows."""
    rows = con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [outputs_table_name(run_id)],
    ).fetchall()
    return tuple(str(r[0]) for r in rows)


def case_clash(names: list[str], have: tuple[str, ...] | list[str]) -> tuple[str, str] | None:
    """The first ``(new, existing)`` pair of names equal ignoring case but spelled differently."""
    seen = {h.casefold(): h for h in [*KEY_COLUMNS, *have]}
    for name in names:
        other = seen.setdefault(name.casefold(), name)
        if other != name:
            return name, other
    return None


def insert_outputs(con: duckdb.DuckDBPyConnection, run_id: str, data: pa.Table) -> None:
    """Append ``data`` to the run's outputs table, creating it or adding columns as needed.

    Args:
        con: a connection inside the flush's transaction (a failure rolls all of it back).
        run_id: the run.
        data: the rows, one column per key (`_rows.outputs_table`).

    Raises:
        StoreError: two keys differ only in case (the message names both).
    """
    table = ident(outputs_table_name(run_id))
    have = output_columns(con, run_id)
    clash = case_clash(list(data.column_names), have)
    if clash is not None:
        raise StoreError(
            f"output key {clash[0]!r} equals the column {clash[1]!r} ignoring case (two workers returned both "
            f"spellings in one flush); DuckDB column names ignore case, so return one spelling from "
            f"`process_batch` and resume the run with the same `run_name`"
        )
    con.register(_VIEW, data)
    # No `finally`: after a failed statement the transaction is aborted, so unregistering would raise
    # and hide the real error; the caller's ROLLBACK drops the view.
    if not have:
        con.execute(f"CREATE TABLE {table} AS SELECT * FROM {ident(_VIEW)} LIMIT 0")
    for name, kind, *_ in con.execute(f"DESCRIBE {ident(_VIEW)}").fetchall():
        if have and name not in have:
            con.execute(f"ALTER TABLE {table} ADD COLUMN {ident(name)} {type_name(con, kind)}")
    con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM {ident(_VIEW)}")
    con.unregister(_VIEW)
