"""Turning a ``process_batch`` return value into per-sample columns (numpy or lists).

Whether the columns pickle is checked once, where the batch is sent (``loop``): `check_picklable`
for a sink that does not pickle at once, `unpicklable` to name the column when a pipe's pickling failed.

Must not import DuckDB or other nbbatch layers; runs inside workers.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["RESERVED", "KeyCase", "OutputError", "check_picklable", "to_columns", "unpicklable"]

RESERVED = frozenset({"run_id", "rank", "batch_idx", "global_batch", "sample_index"})


class OutputError(ValueError):
    """The return value of ``process_batch`` cannot be stored as one row per sample."""


def _own(value: Any) -> Any:
    """A copy of a CPU tensor or array the processor may still write into (a buffer reused across batches)."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone() if value.device.type == "cpu" else value  # `.cpu()` will copy it
    if isinstance(value, np.ndarray):
        return value.copy()
    return value


def _column(name: str, value: Any, rows: int, copy: bool) -> Any:
    if copy:
        value = [_own(v) for v in value] if isinstance(value, (list, tuple)) else _own(value)
    if isinstance(value, torch.Tensor):
        value = value.detach()
        if value.dtype == torch.bfloat16 or value.dtype == torch.float16:
            value = value.float()
        value = value.cpu().numpy()
    if isinstance(value, np.ndarray):
        if value.ndim == 0:
            raise OutputError(
                f"output {name!r} is a scalar; return one value per sample (shape [{rows}, ...]), "
                f"or report it with `context.report_metrics`"
            )
        length = value.shape[0]
    elif isinstance(value, (list, tuple)):
        value = [v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else v for v in value]
        length = len(value)
    else:
        raise OutputError(
            f"output {name!r} has type {type(value).__name__}; return a tensor, numpy array or list "
            f"with one entry per sample"
        )
    if length != rows:
        raise OutputError(
            f"output {name!r} has {length} entries but the batch holds {rows} samples; return one entry "
            f"per sample (first dimension = batch length)"
        )
    return value


def _may_hold_objects(value: Any) -> bool:
    """Whether a column can hold arbitrary Python objects (numeric arrays always pickle)."""
    return not isinstance(value, np.ndarray) or value.dtype.kind == "O"


def _not_picklable(name: str, exc: BaseException) -> OutputError:
    return OutputError(
        f"output {name!r} holds a value that cannot be pickled ({type(exc).__name__}: {exc}); outputs "
        f"are sent to the launcher and stored in DuckDB, so return numbers, strings, arrays or tensors "
        f"(convert objects with e.g. `str(x)` or `x.tolist()`)"
    )


def check_picklable(columns: dict[str, Any]) -> None:
    """Raise `OutputError` naming the first column of ``columns`` that does not pickle.

    Values go to the launcher by pickle (or into a segment): found out inside the batch, the error
    is the batch's, not the run's.
    """
    for name, value in columns.items():
        if _may_hold_objects(value):
            try:
                pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception as exc:
                raise _not_picklable(name, exc) from exc


def unpicklable(columns: dict[str, Any] | None, exc: BaseException) -> OutputError:
    """The batch's error after pickling its event failed with ``exc``: names the column when one is at fault."""
    try:
        check_picklable(columns or {})
    except OutputError as found:
        return found
    return OutputError(
        f"the metrics reported in this batch cannot be pickled ({type(exc).__name__}: {exc}); pass numbers, "
        f"strings or tensors to `context.report_metrics`"
    )


class KeyCase:
    """Output keys known so far, by ``casefold``: DuckDB matches column names ignoring case.

    Seeded with the row's key columns and the columns earlier flushes or attempts stored, so ``x``
    next to ``X``, or ``Sample_Index``, is the batch's error rather than a silently renamed column.
    """

    def __init__(self, stored: tuple[str, ...] = ()) -> None:
        self.known = {name.casefold(): name for name in (*sorted(RESERVED), *stored)}

    def check(self, keys: list[str]) -> None:
        """Raise `OutputError` naming both keys if two of ``keys``, or one and a known key, differ only in case."""
        seen = dict(self.known)
        for key in keys:
            other = seen.setdefault(key.casefold(), key)
            if other != key:
                where = "a column every row carries" if other in RESERVED else "another output key of this run"
                raise OutputError(
                    f"output key {key!r} equals {other!r} ({where}) ignoring case; column names in DuckDB "
                    f"ignore case, so rename one of them in `process_batch`"
                )

    def add(self, keys: list[str]) -> None:
        """Remember the keys of a batch that succeeded."""
        for key in keys:
            self.known.setdefault(key.casefold(), key)


def to_columns(value: Any, rows: int, keys: KeyCase | None = None, copy: bool = False) -> dict[str, Any] | None:
    """Columns of one batch's outputs, or None when ``process_batch`` returned None.

    A tensor or array becomes column ``output``; a dict gives one column per key. ``keys`` holds
    the keys known so far (a fresh `KeyCase` when None); it is not updated here. With ``copy``,
    no column shares memory with what the processor returned: for columns kept after the batch
    (a segment, a torchrun peer's buffer), since a processor may return a view of a buffer it
    fills again in the next batch.
    """
    if value is None:
        return None
    if isinstance(value, (torch.Tensor, np.ndarray, list, tuple)):
        value = {"output": value}
    if not isinstance(value, Mapping):
        raise OutputError(
            f"process_batch returned {type(value).__name__}; return None, a tensor, or a dict of "
            f"per-sample tensors/arrays/lists"
        )
    for name in value:
        if not isinstance(name, str) or not name or "\x00" in name:
            raise OutputError(f"output keys must be non-empty strings without NUL characters, got {name!r}")
        if name in RESERVED:
            raise OutputError(f"output key {name!r} is reserved for the row's identity; rename it")
    (keys or KeyCase()).check(list(value))
    columns = {name: _column(name, column, rows, copy) for name, column in value.items()}
    return columns or None
