"""Per-sample output columns as Arrow tables, and the names of output segment files.

Shared by the workers, which write each checkpoint step's outputs as one Parquet segment
(``_worker/segments.py``), and the store, which inserts small outputs inline and reads segments
back through a view (``_store/segments.py``): one builder, so both paths give the same column
types. Pure pyarrow and numpy. Must not import DuckDB, torch or anything from nbbatch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

__all__ = [
    "SEGMENT_FOLDER",
    "SEGMENT_SUFFIX",
    "column_array",
    "is_segment_name",
    "marker_name",
    "outputs_table",
    "segment_name",
]

#: Folder of a run's segments, inside the run's output folder (``<store stem>_outputs/<run_id>/``).
SEGMENT_FOLDER = "segments"
SEGMENT_SUFFIX = ".parquet"
_SEGMENT = re.compile(r"seg-[0-9A-Za-z]+-a[0-9]+-r[0-9]+-s[0-9]+\.parquet")


def segment_name(run_id: str, attempt: int, rank: int, step: int) -> str:
    """The file of one rank's outputs of one checkpoint step: ``seg-<run_id>-a<attempt>-r<rank>-s<step>.parquet``.

    Deterministic, so a rewrite after a crash replaces the same file instead of adding another.

    Example:
        >>> segment_name("ab12", 2, 0, 40)
        'seg-ab12-a2-r0-s40.parquet'
    """
    return f"seg-{run_id}-a{int(attempt)}-r{int(rank)}-s{int(step)}{SEGMENT_SUFFIX}"


def is_segment_name(name: str) -> bool:
    """Whether ``name`` is a segment file name as `segment_name` makes them (readers accept nothing else)."""
    return bool(_SEGMENT.fullmatch(name))


def marker_name(attempt: int) -> str:
    """The file the launcher puts into the segment folder for each attempt.

    A worker that sees it knows the folder is the one the store's writer sees (same machine, or
    storage every node mounts), so it writes segments there; a torchrun rank that does not see it
    ships its outputs to rank 0 instead.
    """
    return f"attempt-{int(attempt)}.json"


def _flat_array(flat: np.ndarray) -> pa.Array:
    """``pa.array(flat)`` for a 1-d numpy array, zero-copy for numbers.

    ``pa.array`` on any numpy array imports pandas the first time (about 0.2 s of CPU in every
    worker process, and its memory); numbers in native byte order do not need it.
    """
    if flat.dtype.kind in "iuf" and flat.dtype.isnative:
        return pa.Array.from_buffers(pa.from_numpy_dtype(flat.dtype), len(flat), [None, pa.py_buffer(flat)])
    return pa.array(flat)


def _repeated(text: str, rows: int) -> pa.Array:
    """A string column holding ``text`` ``rows`` times, built without `pa.array` (see `_flat_array`)."""
    data = text.encode()
    if rows * len(data) >= 2**31:  # past int32 offsets
        return pa.array([text] * rows, pa.string())
    offsets = np.arange(rows + 1, dtype=np.int32) * np.int32(len(data))
    return pa.Array.from_buffers(pa.string(), rows, [None, pa.py_buffer(offsets), pa.py_buffer(data * rows)])


def _numpy_array(arr: np.ndarray) -> pa.Array:
    """A (rows, *shape) array as a column of fixed-size (nested) arrays."""
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    if arr.dtype.kind in "US":
        return pa.array(arr.tolist())
    if arr.dtype.kind == "O":
        return pa.array(arr.tolist())
    flat = _flat_array(np.ascontiguousarray(arr).reshape(-1))
    for size in reversed(arr.shape[1:]):
        flat = pa.FixedSizeListArray.from_arrays(flat, int(size))
    return flat


def column_array(values: Any) -> pa.Array:
    """Convert one output column (numpy array or list) into an Arrow array."""
    if isinstance(values, np.ndarray):
        return _numpy_array(values)
    if isinstance(values, (list, tuple)) and values and isinstance(values[0], np.ndarray):
        return _numpy_array(np.stack(values))
    return pa.array(list(values))


def outputs_table(
    run_id: str,
    batches: Sequence[tuple[int, int, int, int, dict[str, Any]]],
) -> pa.Table:
    """Build the outputs rows of many batches.

    Args:
        run_id: the run.
        batches: ``(rank, batch_idx, global_batch, first_index, columns)`` per batch, where every
            column has one entry per sample.
    """
    keys: dict[str, list[np.ndarray]] = {"rank": [], "batch_idx": [], "global_batch": [], "sample_index": []}
    columns: dict[str, list[pa.Array]] = {}
    total = 0
    for rank, batch_idx, global_batch, first_index, cols in batches:
        rows = len(next(iter(cols.values())))
        keys["rank"].append(np.full(rows, rank, dtype=np.int32))
        keys["batch_idx"].append(np.full(rows, batch_idx, dtype=np.int64))
        keys["global_batch"].append(np.full(rows, global_batch, dtype=np.int64))
        keys["sample_index"].append(np.arange(first_index, first_index + rows, dtype=np.int64))
        for name in cols:
            if name not in columns:  # a key new in this batch: NULL in the earlier ones (in the batch's order)
                columns[name] = [pa.nulls(total)] if total else []
        for name, chunks in columns.items():  # a key this batch lacks is NULL in it, as in later flushes
            chunks.append(column_array(cols[name]) if name in cols else pa.nulls(rows))
        total += rows
    arrays: dict[str, pa.Array | pa.ChunkedArray] = {"run_id": _repeated(run_id, total)}
    for name, pieces in keys.items():
        arrays[name] = _flat_array(np.concatenate(pieces) if pieces else np.array([], dtype=np.int64))
    for name, chunks in columns.items():
        first = next((c.type for c in chunks if c.type != pa.null()), pa.null())
        chunks = [c if c.type == first else pa.nulls(len(c), first) if c.type == pa.null() else c.cast(first)
                  for c in chunks]
        arrays[name] = pa.chunked_array(chunks, type=first)
    return pa.table(arrays)
