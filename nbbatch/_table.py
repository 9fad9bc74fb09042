"""`TableDataset`: a map-style dataset over a DuckDB query or a Parquet/CSV/JSON file.

A batch is read in one query (``__getitems__``): numeric columns come back as tensors, other
values as lists, and torch's default collate turns the batch into a dict of column -> tensor or
list without touching single rows (the row type is registered in ``default_collate_fn_map``, the
extension point torch documents). The object holds only text, so it pickles cheaply into worker
processes; each process opens its own in-memory DuckDB connection on first use. When a run
starts, `bind_inputs` snapshots the rows beside the store (``_store.inputs``) and hands the
workers a dataset that reads only that snapshot. Must not import ``_launch``, ``_worker``,
``_ui``, ``_api`` or ``_run``.
"""

from __future__ import annotations

import collections.abc
import glob
import os
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import duckdb
import numpy as np
import torch
from torch.utils.data import Dataset
from torch.utils.data._utils.collate import collate, default_collate_fn_map

from nbbatch._errors import InvalidDataset
from nbbatch._store import inputs
from nbbatch._store.sql import ident, literal

__all__ = ["TableDataset", "bind_inputs"]

_READERS = {".parquet": "read_parquet", ".pq": "read_parquet", ".csv": "read_csv", ".tsv": "read_csv",
            ".json": "read_json", ".jsonl": "read_json", ".ndjson": "read_json"}
_SQL_START = re.compile(r"^\s*(\(|--|/\*|select\b|with\b|from\b|values\b|table\b|pivot\b|unpivot\b|summarize\b)", re.I)
_TENSOR_TYPES = {
    "BOOLEAN", "TINYINT", "SMALLINT", "INTEGER", "BIGINT", "UTINYINT", "USMALLINT", "UINTEGER", "FLOAT", "DOUBLE",
}
# DECIMAL becomes float64 (as pandas does); these integers may not fit torch's int64.
_NO_DTYPE = re.compile(r"^(UBIGINT|HUGEINT|UHUGEINT|VARINT|BIGNUM)\b")
_ARRAY = re.compile(r"^(?P<elem>[A-Z]+(\(\d+,\d+\))?)(?P<dims>(\[\d+\])+)$")


class TableDataset(Dataset[dict[str, Any]]):
    """Rows of a DuckDB query, or of a Parquet/CSV/JSON file, as a map-style dataset.

    ``len(ds)`` is the number of rows and ``ds[i]`` row ``i`` as a dict of column -> value. A
    batch from a ``DataLoader`` with the default collate is a dict of column -> tensor (numeric
    columns; fixed-size numeric ``ARRAY`` columns add dimensions) or list (text, lists, dates,
    anything else). Rows come in the query's order: give it an ``ORDER BY``.

    Used with `torch_batch_process`, the rows are snapshotted when the run starts; workers read
    the snapshot, and `Run.outputs` with ``inputs=True`` joins them to the outputs.

    Args:
        source: DuckDB SQL (``"SELECT id, path FROM read_parquet('in/*.parquet') ORDER BY id"``)
            or the path of a ``.parquet``, ``.csv``/``.tsv`` or ``.json``/``.jsonl`` file (a glob
            such as ``in/*.parquet`` reads every match).

    Raises:
        InvalidDataset: the query fails in DuckDB, the file is missing, a column has no torch
            dtype (``HUGEINT``, ``UBIGINT``: cast it in the query; ``DECIMAL`` becomes float64), or the source
            is not a string or path.

    Example:
        >>> ds = TableDataset("SELECT * FROM range(5) t(x) ORDER BY x")
        >>> len(ds), ds[2]
        (5, {'x': 2})
    """

    def __init__(self, source: str | os.PathLike[str]) -> None:
        self.source = _check_source(source)
        self.query = _query(self.source)
        self._snapshot: str | None = None
        self._rows: int | None = None
        self._con: duckdb.DuckDBPyConnection | None = None
        self._view: str | None = None
        self._pid = -1
        self._types = _describe(self._connection(), self.query, self.source)
        self._column_kinds = _kinds(self._types, self.source)
        _warn_unordered(self.source, self.query)

    # -- pickling: text only, the connection is per process ---------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_con"], state["_view"], state["_pid"] = None, None, -1
        return state

    def _connection(self) -> duckdb.DuckDBPyConnection:
        """This process's own read connection (a forked child must not reuse its parent's)."""
        if self._con is None or self._pid != os.getpid():
            self._view = None
            self._con = duckdb.connect(":memory:")
            self._con.execute("SET enable_progress_bar = false")  # it would print into the user's output
            self._pid = os.getpid()
            if self._snapshot is not None:
                self._con.execute("SET threads TO 1")  # one batch is a few row groups; threads only add overhead
                # Parse the snapshot's footer once, not per batch (snapshots never change: content-addressed).
                self._con.execute("SET parquet_metadata_cache = true")
        return self._con

    def _table(self) -> str:
        """SQL of the rows with their row number as ``_nbbatch_row``: the snapshot, or the query materialized."""
        con = self._connection()
        if self._snapshot is not None:
            return f"read_parquet({literal(self._snapshot)})"
        if self._view is None:  # without a run, the first read in each process keeps the rows in memory
            try:
                con.execute(f"CREATE TABLE _nbbatch_rows AS SELECT * FROM ({self.query})")
                con.execute(f"CREATE VIEW _nbbatch_view AS SELECT rowid AS {inputs.ROW_COLUMN}, * FROM _nbbatch_rows")
            except duckdb.Error as exc:
                raise _query_failed(self.source, exc) from exc
            self._view = "_nbbatch_view"
        return self._view

    # -- Dataset ----------------------------------------------------------------------------------
    def __len__(self) -> int:
        if self._rows is None:  # a count, not a read: `torch_batch_process` sizes the run before the snapshot
            try:
                self._rows = int(self._connection().execute(f"SELECT count(*) FROM ({self.query})").fetchall()[0][0])
            except duckdb.Error as exc:
                raise _query_failed(self.source, exc) from exc
        return self._rows

    def __getitem__(self, index: int) -> dict[str, Any]:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"TableDataset indices are integers, got {type(index).__name__}")
        n = len(self)
        i = int(index) + n if index < 0 else int(index)
        if not 0 <= i < n:
            raise IndexError(f"row {index} is out of range for a TableDataset of {n} rows")
        return dict(self.__getitems__([i])[0])

    def __getitems__(self, indices: Sequence[int]) -> _Batch:
        """Rows ``indices`` in one read: a sequence of rows that the default collate turns into columns."""
        wanted = np.asarray(indices, dtype=np.int64)
        if wanted.size == 0:
            return _Batch({name: [] for name, _ in self._column_kinds}, 0)
        lo, hi = int(wanted.min()), int(wanted.max())
        row = inputs.ROW_COLUMN
        con = self._connection()
        names = ", ".join(f"{inputs.column_sql(con, name, dtype)} AS {ident(name)}" for name, dtype in self._types)
        table = self._table()  # `read_parquet('<literal>')` or this process's own view
        if hi - lo + 1 == wanted.size and bool(np.all(np.diff(wanted) == 1)):  # a sharded batch: one range
            sql = f"SELECT {names} FROM {table} WHERE {row} BETWEEN ? AND ? ORDER BY {row}"  # sql: table from _table()
            fetched = self._fetch(sql, [lo, hi])
            order = None
            complete = len(next(iter(fetched.values()))) == wanted.size
        else:  # any order, repeats allowed: read each row once, then pick
            where = f"{row} BETWEEN ? AND ? AND list_contains(?, {row})"
            sql = f"SELECT {row}, {names} FROM {table} WHERE {where} ORDER BY {row}"  # sql: table from _table()
            fetched = self._fetch(sql, [lo, hi, sorted(set(wanted.tolist()))])
            rows = np.asarray(fetched.pop(row))
            order = np.searchsorted(rows, wanted)
            picked = rows[np.minimum(order, len(rows) - 1)] if len(rows) else np.empty(0, dtype=np.int64)
            complete = bool(np.all(order < len(rows))) and bool(np.all(picked == wanted))
        if not complete:
            raise IndexError(f"rows {lo}..{hi} are out of range for a TableDataset of {len(self)} rows")
        columns = {name: _column(name, kind, fetched[name], order) for name, kind in self._column_kinds}
        return _Batch(columns, int(wanted.size))

    def _fetch(self, sql: str, params: list[Any]) -> dict[str, Any]:
        try:
            return dict(self._connection().execute(sql, params).fetchnumpy())
        except duckdb.Error as exc:
            raise _query_failed(self.source, exc) from exc

    @property
    def columns(self) -> list[str]:
        """The column names, in the query's order."""
        return [name for name, _ in self._column_kinds]

    def __repr__(self) -> str:
        where = f", snapshot {self._snapshot!r}" if self._snapshot else ""
        return f"TableDataset({self.source!r}{where})"

    def _check_nulls(self, nulls: Sequence[int]) -> None:
        """Refuse NULLs (counted by the snapshot) in columns that become tensors."""
        for (name, kind), count in zip(self._column_kinds, nulls):
            if count and kind != "list":
                raise InvalidDataset(
                    f"column `{name}` of `{self.source}` has {count} NULL values, which a tensor cannot hold; fill "
                    f"them in the query, e.g. `coalesce({ident(name)}, 0) AS {ident(name)}`, or filter them out with "
                    f"`WHERE {ident(name)} IS NOT NULL`"
                )

    def _bound(self, path: str, info: inputs.InputsInfo) -> TableDataset:
        """A copy that reads the snapshot ``path`` (what workers of a run get)."""
        bound = TableDataset.__new__(TableDataset)
        bound.__dict__.update(self.__getstate__())
        bound._snapshot, bound._rows, bound._types = path, info.rows, list(info.columns)
        bound._column_kinds = _kinds(bound._types, info.source)
        return bound


class _Row(Mapping[str, Any]):
    """One row of a `_Batch`, read-only; the default collate sees this type and takes the batch's columns."""

    __slots__ = ("_batch", "_i")

    def __init__(self, batch: _Batch, i: int) -> None:
        self._batch, self._i = batch, i

    def __getitem__(self, key: str) -> Any:
        value = self._batch.columns[key][self._i]
        return value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value

    def __iter__(self) -> Iterator[str]:
        return iter(self._batch.columns)

    def __len__(self) -> int:
        return len(self._batch.columns)


class _Batch(collections.abc.Sequence[_Row]):
    """What ``__getitems__`` returns: the columns of a batch, also viewable as a sequence of rows."""

    def __init__(self, columns: dict[str, Any], rows: int) -> None:
        self.columns, self._rows = columns, rows

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self._rows))]
        if not -self._rows <= i < self._rows:
            raise IndexError(i)
        return _Row(self, i % self._rows)


def _collate_rows(batch: Sequence[Any], *, collate_fn_map: dict[Any, Any] | None = None) -> dict[str, Any]:
    """Default collate of `_Row` items: a whole `_Batch` gives its columns as they are."""
    if isinstance(batch, _Batch):
        return dict(batch.columns)
    first = batch[0]  # rows picked one by one (e.g. a custom sampler through ds[i]): collate per key
    return {key: collate([row[key] for row in batch], collate_fn_map=collate_fn_map) for key in first}


default_collate_fn_map[_Row] = _collate_rows


def _column(name: str, kind: str, values: Any, order: Any) -> Any:
    """One fetched column as a tensor (numeric) or a list (anything else)."""
    if isinstance(values, np.ma.MaskedArray) and bool(np.any(values.mask)):
        if kind != "list":
            raise InvalidDataset(
                f"column `{name}` has NULL values, which a tensor cannot hold; fill them in the query, e.g. "
                f"`coalesce({ident(name)}, 0) AS {ident(name)}`, or filter them out with `WHERE {ident(name)} IS NOT NULL`"
            )
    if order is not None:
        values = values[order]
    if kind == "tensor":
        return torch.from_numpy(np.ascontiguousarray(np.asarray(values)))
    if kind == "array":
        return torch.from_numpy(np.ascontiguousarray(np.stack([np.asarray(v) for v in values])))
    return [_plain(v) for v in values.tolist()]


def _plain(value: Any) -> Any:
    """A fetched value as plain Python (list columns arrive as numpy arrays)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _kinds(columns: Sequence[tuple[str, str]], source: str) -> list[tuple[str, str]]:
    """``(name, kind)``: ``tensor``, ``array`` (fixed-size numeric ARRAY) or ``list``; refuses types without a dtype."""
    out = []
    for name, dtype in columns:
        array = _ARRAY.match(dtype)
        elem = array.group("elem") if array else dtype
        if _NO_DTYPE.match(elem):
            raise InvalidDataset(
                f"column `{name}` of `{source}` is {dtype}, which cannot become a tensor (torch has no such dtype); "
                f"cast it in the query, e.g. `SELECT {ident(name)}::DOUBLE AS {ident(name)}` (or `::BIGINT` when the "
                f"values fit, or `::VARCHAR` for a list of strings)"
            )
        if elem in _TENSOR_TYPES or elem.startswith("DECIMAL"):
            out.append((name, "array" if array else "tensor"))
        else:
            out.append((name, "list"))
    return out


def _describe(con: duckdb.DuckDBPyConnection, query: str, source: str) -> list[tuple[str, str]]:
    """``(name, DuckDB type)`` of the query's columns, without running it."""
    try:
        described = con.execute(f"DESCRIBE {query}").fetchall()
    except duckdb.Error as exc:
        raise _query_failed(source, exc) from exc
    return [(str(n), str(t)) for n, t, *_ in described]


def _query_failed(source: str, exc: BaseException) -> InvalidDataset:
    text = str(exc).strip()
    hint = "fix the SQL (try it in `duckdb.sql(...)`)"
    if "No files found" in text or "No such file" in text or "does not exist" in text:
        hint = f"check the file path (relative paths start at the working directory `{os.getcwd()}`)"
    return InvalidDataset(f"the TableDataset query failed in DuckDB: {text}\nSource: `{source}`; {hint}")


def _check_source(source: Any) -> str:
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise InvalidDataset(
            f"TableDataset needs DuckDB SQL or a file path (str), got {source!r}; e.g. "
            f"`TableDataset(\"SELECT * FROM read_parquet('in.parquet') ORDER BY id\")`"
        )
    return source


def _is_sql(source: str) -> bool:
    return bool(_SQL_START.match(source))


def _query(source: str) -> str:
    """The SQL to run for ``source``: the SQL itself, or a ``read_*`` of the (absolute) file path."""
    if _is_sql(source):
        return source.strip().rstrip(";") + "\n"  # a trailing `-- comment` must not swallow the `)` we wrap it in
    path = os.path.abspath(os.path.expanduser(source))
    ext = os.path.splitext(path[:-3] if path.lower().endswith(".gz") else path)[1].lower()
    reader = _READERS.get(ext)
    if reader is None:
        raise InvalidDataset(
            f"TableDataset source `{source}` is neither SQL (it does not start with SELECT, WITH or FROM) nor a "
            f"file ending in {', '.join(sorted(_READERS))}; pass a query such as "
            f"`SELECT * FROM read_csv('{source}')`"
        )
    if not glob.glob(path):
        raise InvalidDataset(
            f"TableDataset source `{source}`: no such file (looked for `{path}`); check the path, relative "
            f"paths start at the working directory"
        )
    return f"SELECT * FROM {reader}({literal(path)})"


_READ_CALL = re.compile(r"\b(read_\w+|glob|parquet_scan)\s*\(\s*(?P<arg>'[^']*'|\[)?", re.I)


def _warn_unordered(source: str, query: str) -> None:
    """Warn when rows come from several files and no ORDER BY fixes their order."""
    if re.search(r"\border\s+by\b", query, re.I):
        return
    calls = list(_READ_CALL.finditer(query))
    several = len(calls) > 1 or any(
        (m.group("arg") or "").startswith("[") or any(ch in (m.group("arg") or "") for ch in "*?[") for m in calls
    )
    if several:
        warnings.warn(
            f"TableDataset `{source}` reads several files without ORDER BY, so its row order is not "
            f"guaranteed (row i may differ between runs); add an ORDER BY, e.g. on an id column or on "
            f"`filename` with `read_parquet(..., filename = true)`",
            UserWarning, stacklevel=3,
        )


def bind_inputs(dataset: Any, store: str, rows: int | None = None) -> tuple[Any, inputs.InputsInfo | None]:
    """For a `TableDataset`, snapshot its rows beside ``store`` and return a copy that reads the snapshot.

    Other datasets come back unchanged, with no inputs info. ``rows`` is the length the run was
    planned with; a source that changed since then is refused rather than half-used.
    """
    if not isinstance(dataset, TableDataset):
        return dataset, None
    if dataset._snapshot is not None:  # already a run's snapshot (e.g. handed on by a caller)
        digest = os.path.basename(dataset._snapshot).removesuffix(".parquet")
        return dataset, inputs.InputsInfo(dataset.source, len(dataset), digest, tuple(dataset._types))
    info = inputs.take_snapshot(dataset._connection(), dataset.query, store, dataset.source)
    if rows is not None and info.rows != rows:
        raise InvalidDataset(
            f"the TableDataset source changed while the run started: it had {rows} rows, its snapshot {info.rows}; "
            f"wait until the files stop changing, then start the run again"
        )
    bound = dataset._bound(inputs.snapshot_path(store, info.content_hash), info)
    bound._check_nulls(info.nulls)  # here, in the caller, rather than as a failing batch in a worker
    return bound, info
