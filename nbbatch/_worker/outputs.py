"""Turning a ``process_batch`` return value into per-sample columns (numpy or lists).

Must not import DuckDB or other nbbatch layers; runs inside workers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["RESERVED", "OutputError", "to_columns"]

RESERVED = frozenset({"run_id", "rank", "batch_idx", "global_batch", "sample_index"})


class OutputError(ValueError):
    """The return value of ``process_batch`` cannot be stored as one row per sample."""


def _column(name: str, value: Any, rows: int) -> Any:
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


def to_columns(value: Any, rows: int) -> dict[str, Any] | None:
    """Columns of one batch's outputs, or None when ``process_batch`` returned None.

    A tensor or array becomes column ``output``; a dict gives one column per key.
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
    columns: dict[str, Any] = {}
    for name, column in value.items():
        if not isinstance(name, str) or not name:
            raise OutputError(f"output keys must be non-empty strings, got {name!r}")
        if name in RESERVED:
            raise OutputError(f"output key {name!r} is reserved for the row's identity; rename it")
        columns[name] = _column(name, column, rows)
    return columns or None
