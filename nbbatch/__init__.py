"""nbbatch: Determined-compatible batch inference for PyTorch, with an exactly-once DuckDB store.

Example:
    >>> from nbbatch import torch_batch_process, TorchBatchProcessor
    >>> class Double(TorchBatchProcessor):
    ...     def __init__(self, context): pass
    ...     def process_batch(self, batch, batch_idx): return {"y": batch * 2}
    >>> run = torch_batch_process(Double, list(range(10)), batch_size=4)   # doctest: +SKIP

Names load lazily, so ``%load_ext nbbatch`` and ``nbbatch --help`` do not pay for torch or panel.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "InvalidArgument": "nbbatch._errors",
    "InvalidDataset": "nbbatch._errors",
    "InvalidRunName": "nbbatch._errors",
    "MetricReducer": "nbbatch._processor",
    "NbbatchError": "nbbatch._errors",
    "ResumeMismatch": "nbbatch._errors",
    "Run": "nbbatch._run",
    "RunConfig": "nbbatch._options",
    "RunFailed": "nbbatch._errors",
    "RunNotFound": "nbbatch._errors",
    "Status": "nbbatch._events",
    "StoreBusy": "nbbatch._errors",
    "StoreError": "nbbatch._errors",
    "TableDataset": "nbbatch._table",
    "TorchBatchProcessor": "nbbatch._processor",
    "TorchBatchProcessorContext": "nbbatch._processor",
    "WorkerDied": "nbbatch._errors",
    "WorkerFailed": "nbbatch._errors",
    "dashboard": "nbbatch._ui.dashboard",
    "list_runs": "nbbatch._run",
    "open_run": "nbbatch._run",
    "torch_batch_process": "nbbatch._api",
}

__all__ = sorted([*_EXPORTS, "load_ipython_extension", "unload_ipython_extension"], key=str.lower)

if TYPE_CHECKING:  # pragma: no cover
    from nbbatch._api import torch_batch_process
    from nbbatch._errors import (
        InvalidArgument,
        InvalidDataset,
        InvalidRunName,
        NbbatchError,
        ResumeMismatch,
        RunFailed,
        RunNotFound,
        StoreBusy,
        StoreError,
        WorkerDied,
        WorkerFailed,
    )
    from nbbatch._events import Status
    from nbbatch._options import RunConfig
    from nbbatch._processor import MetricReducer, TorchBatchProcessor, TorchBatchProcessorContext
    from nbbatch._run import Run, list_runs, open_run
    from nbbatch._table import TableDataset
    from nbbatch._ui.dashboard import dashboard


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nbbatch' has no attribute {name!r}")
    if name == "torch_batch_process":
        # Start the workers' forkserver before importing torch here, so both import it at once.
        from nbbatch._launch.forkserver import warm_up

        warm_up()
    value = getattr(importlib.import_module(module), name)
    try:
        value.__module__ = "nbbatch"
    except (AttributeError, TypeError):
        pass
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext nbbatch``: register ``%batchprocess`` and ``%%batchprocess``."""
    from nbbatch._ui.magic import BatchMagics

    ipython.register_magics(BatchMagics)


def unload_ipython_extension(ipython: Any) -> None:
    """``%unload_ext nbbatch``: remove the magics."""
    for kind in ("line", "cell"):
        ipython.magics_manager.magics[kind].pop("batchprocess", None)
