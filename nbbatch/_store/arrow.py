"""Turning per-sample outputs and event rows into Arrow tables for bulk inserts.

DuckDB ingests Arrow at ~500k rows/s against ~2k rows/s for ``executemany``, so every insert in
the store goes through here. The Arrow schema of a store table comes from its column list in
``schema.py`` (`arrow_schema`); the per-sample outputs table itself is built by ``nbbatch._rows``,
which workers share for their segments. Must not import anything from nbbatch but ``_rows`` and
``_store.schema``.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

from nbbatch._rows import column_array, outputs_table
from nbbatch._store.schema import DuckType, Table

__all__ = ["ARROW_TYPES", "arrow_schema", "column_array", "jsonable", "outputs_table", "rows_table", "timestamp"]


def timestamp(t: float | None) -> dt.datetime | None:
    """Epoch seconds as a naive UTC datetime (the store's TIMESTAMP convention)."""
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, tz=dt.timezone.utc).replace(tzinfo=None)


def rows_table(rows: Sequence[dict[str, Any]], table: Table) -> pa.Table:
    """Rows of the store table ``table`` as Arrow, typed by its column list (no type guessing on small inputs)."""
    return pa.Table.from_pylist(list(rows), schema=arrow_schema(table))


#: The Arrow type of each DuckDB type the store's tables use (``schema.DuckType``).
ARROW_TYPES: dict[DuckType, pa.DataType] = {
    "VARCHAR": pa.string(), "JSON": pa.string(), "BLOB": pa.binary(), "BOOLEAN": pa.bool_(),
    "INTEGER": pa.int32(), "BIGINT": pa.int64(), "BIGINT[]": pa.list_(pa.int64()), "DOUBLE": pa.float64(),
    "TIMESTAMP": pa.timestamp("us"),
}


@functools.cache
def arrow_schema(table: Table) -> pa.Schema:
    """The Arrow schema of rows of a store table, from its column list."""
    return pa.schema([(c.name, ARROW_TYPES[c.type]) for c in table.columns])


def jsonable(value: Any) -> Any:
    """Convert numpy/torch scalars and arrays into JSON-friendly Python values."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if hasattr(value, "tolist") and callable(value.tolist):
        return jsonable(value.tolist())
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return repr(value)
