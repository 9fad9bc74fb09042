"""`torch_batch_process`: check the arguments, plan the shards, launch the workers, return a Run.

All validation happens here, in the caller's process, before any worker starts, so errors and
warnings show up where the user called (a notebook cell, a script line). Determined's helper
names (`_validate_dataloader_kwargs`, `_validate_iterate_length`) stay module-level, as there.
"""

from __future__ import annotations

import inspect
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sized
from typing import Any

import cloudpickle
import torch
from torch.utils.data import IterableDataset

from nbbatch._errors import InvalidArgument, InvalidDataset
from nbbatch._options import DEFAULT_BATCH_SIZE, OnError, RunConfig, option, validate
from nbbatch._plan import make_sharding
from nbbatch._progress import NullReporter, Reporter, in_jupyter, terminal_reporter
from nbbatch._run import Run, default_store
from nbbatch._store.schema import outputs_folder
from nbbatch._store.records import RunSpec
from nbbatch._table import bind_inputs

__all__ = ["RunConfig", "torch_batch_process"]

logger = logging.getLogger("nbbatch")

def _validate_dataloader_kwargs(dataloader_kwargs: dict[str, Any], batch_size: int | None) -> None:
    """Determined's checks, in Determined's order and words."""
    if dataloader_kwargs.get("shuffle", False):
        raise InvalidArgument("'shuffle' must be false for accurate sharding and checkpointing")
    if "sampler" in dataloader_kwargs:
        raise InvalidArgument("Please remove 'sampler' arg as we will initialize a sampler automatically.")
    if "batch_sampler" in dataloader_kwargs:
        raise InvalidArgument("Please remove 'batch_sampler' arg as we will initialize a batch_sampler automatically.")
    if batch_size is not None and "batch_size" in dataloader_kwargs:
        raise InvalidArgument("batch_size is passed into torch_batch_process and dataloader_kwargs")


def _validate_iterate_length(iterate_length: int | None, times_iterate: int) -> int:
    """Determined's `max_batches` rule: invalid values warn and fall back to the whole shard."""
    if iterate_length is None:
        return times_iterate
    if iterate_length <= 0:
        warnings.warn(
            f"iterate_length {iterate_length} is not valid. Ignoring this argument and iterate over entire dataset once",
            stacklevel=4,
        )
        return times_iterate
    if iterate_length > times_iterate:
        warnings.warn(
            f"iterate_length {iterate_length} exceeds sharded dataset length. Ignoring this argument and iterate "
            "over entire dataset once",
            stacklevel=4,
        )
        return times_iterate
    return iterate_length


def _processor_name(cls: Any) -> str:
    module = getattr(cls, "__module__", None) or "?"
    qualname = getattr(cls, "__qualname__", None) or getattr(cls, "__name__", None) or repr(cls)
    # A class defined in a notebook or script is identified by its name, wherever it was run from.
    if module in ("__main__", "__mp_main__") or module.startswith("ipykernel_"):
        return str(qualname)
    return f"{module}.{qualname}"


def _check_processor(cls: Any) -> None:
    if not callable(cls):
        raise InvalidArgument(
            f"`batch_processor_cls` must be a TorchBatchProcessor subclass (the class, not an instance), got {cls!r}"
        )
    if inspect.isclass(cls) and inspect.isabstract(cls):
        missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
        raise TypeError(
            f"Can't instantiate abstract class {cls.__name__} with abstract methods {missing}; define them in "
            f"{cls.__name__} (`__init__(self, context)` and `process_batch(self, batch, batch_idx)`)"
        )


def _default_processes() -> int:
    return max(1, torch.cuda.device_count())


def _check(
    batch_processor_cls: Any, dataset: Any, given: Mapping[str, Any], world_size: int | None
) -> tuple[RunConfig, int, int]:
    """Validate everything; returns the config, dataset length and iterate length.

    ``given`` holds the options by name; their records check them first (`_options.validate`),
    then come the checks that need more than one value or the dataset, and the defaults that
    depend on the machine or the environment. ``world_size`` is torchrun's, or None locally.
    """
    values = validate(given)
    kwargs = values["dataloader_kwargs"] = values["dataloader_kwargs"] or {}
    _validate_dataloader_kwargs(kwargs, values["batch_size"])
    if values["batch_size"] is None:
        values["batch_size"] = option("batch_size").require(kwargs.pop("batch_size", DEFAULT_BATCH_SIZE))
    _check_processor(batch_processor_cls)
    n = _dataset_len(dataset)
    values["num_processes"] = world_size or values["num_processes"] or _default_processes()
    # Called from here, so that its warnings' stacklevel points at the caller of torch_batch_process.
    iterate_length = _validate_iterate_length(
        values["max_batches"], math.ceil(n / values["batch_size"] / values["num_processes"])
    )
    if values["store"] is None:
        values["store"] = option("store").require(default_store())
    return RunConfig.of(values), n, iterate_length


def _dataset_len(dataset: Any) -> int:
    """A map-style dataset's length; nbbatch shards by index."""
    if isinstance(dataset, IterableDataset):
        raise InvalidArgument(
            "IterableDatasets are not supported: nbbatch shards by index; wrap the data in a map-style "
            "Dataset with `__len__` and `__getitem__`"
        )
    if not isinstance(dataset, Sized):
        raise InvalidDataset("Dataset must implement __len__()")
    return len(dataset)


def _reporter(progress: bool | Reporter, store: str) -> Reporter:
    """The display ``progress`` asks for; in Jupyter the widget, which reads worker tracebacks from ``store``."""
    if progress is False or progress is None:
        return NullReporter()
    if progress is not True:
        return progress
    if in_jupyter():
        from nbbatch._ui.widgets import widget_reporter

        return widget_reporter(store)
    return terminal_reporter()


def _pickle_user_code(batch_processor_cls: Any, dataset: Any, kwargs: dict[str, Any]) -> bytes:
    try:
        return bytes(cloudpickle.dumps((batch_processor_cls, dataset, kwargs)))
    except Exception as exc:
        raise InvalidArgument(
            f"cannot send the processor class, dataset or dataloader_kwargs to worker processes: "
            f"{type(exc).__name__}: {exc}. Open files, locks, sockets and live database connections "
            f"cannot be pickled; create them in `__init__(self, context)` or lazily in `__getitem__`"
        ) from exc


def torch_batch_process(
    batch_processor_cls: type[Any],
    dataset: Any,
    batch_size: int | None = None,
    max_batches: int | None = None,
    checkpoint_interval: int = 5,
    dataloader_kwargs: dict[str, Any] | None = None,
    distributed_context: Any = None,
    *,
    num_processes: int | None = None,
    store: str | os.PathLike[str] | None = None,
    run_name: str | None = None,
    on_error: OnError = "raise",
    max_failures: int | None = None,
    progress: bool | Reporter = True,
    batch_timeout: float | None = None,
    launch: dict[str, Any] | None = None,
    trust: bool = False,
) -> Run:
    """Run ``batch_processor_cls`` over ``dataset`` on worker processes; outputs go to DuckDB.

    Same arguments and semantics as Determined's ``torch_batch_process``; the keyword-only
    options are nbbatch's.

    Args:
        batch_processor_cls: a `TorchBatchProcessor` subclass; built once per worker as
            ``cls(context=...)``.
        dataset: a map-style dataset with ``__len__``.
        batch_size: samples per batch (default ``dataloader_kwargs["batch_size"]`` or 1).
        max_batches: cap on batches **per worker**; invalid values warn and are ignored.
        checkpoint_interval: commit progress every this many batches per worker.
        dataloader_kwargs: passed to ``torch.utils.data.DataLoader`` (no shuffle/sampler).
        distributed_context: Determined-only; must be None.
        num_processes: local worker processes (default: one per GPU, else 1).
        store: DuckDB file (default ``nbbatch.duckdb``, or ``$NBBATCH_STORE``).
        run_name: name of the run (letters, digits and ``._-``, not starting with ``-`` or
            ``.``); naming an unfinished run resumes it, a finished one is returned as is.
        on_error: ``"raise"`` stops the run at the first exception; ``"skip"`` records and skips.
        max_failures: with ``"skip"``, fail the run once more batches than this failed.
        progress: True for a widget in Jupyter / a bar in a terminal / lines in logs, False for
            none, or a `Reporter`.
        batch_timeout: fail the run if one ``process_batch`` call runs longer (finite seconds > 0).
        launch: how to re-create the processor and dataset (set by the CLI, for resume buttons).
        trust: resume ``run_name`` even if its stored records (launch info, reducer states) are
            not signed by this user, and sign them; only after `nbbatch show RUN` showed what
            they run. Without it such a resume raises `StoreError` (see README "Security").

    Returns:
        The `Run` handle (``status`` is ``done``, or ``preempted`` after `Run.stop`).

    Raises:
        InvalidArgument: a bad argument (Determined's messages where Determined checks);
            `InvalidRunName` for a ``run_name`` outside the rule above.
        WorkerFailed: a worker raised (or died); carries rank, batch_idx, indices, traceback.
        ResumeMismatch: ``run_name`` exists with another fingerprint.
        StoreBusy: another live run writes the same store.
        StoreError: resuming ``run_name`` meets records this user did not sign; the message says
            how to check and trust them.
        KeyboardInterrupt: after Ctrl-C, once the run committed and was marked preempted.

    Example:
        >>> run = torch_batch_process(MyProcessor, dataset, batch_size=64, num_processes=2)  # doctest: +SKIP
        >>> run.outputs().df()                                                              # doctest: +SKIP
    """
    given = dict(locals())  # the options by name, as `_options.OPTIONS` lists them (a unit test keeps both in step)
    if distributed_context is not None:
        raise InvalidArgument(
            "`distributed_context` is Determined-specific; nbbatch joins torch.distributed by itself "
            "(run the script under `torchrun`), so drop the argument"
        )
    from nbbatch._launch import torchrun
    from nbbatch._launch.teardown import register_fast_exit

    register_fast_exit()

    env = torchrun.environment()
    if env is not None and num_processes is not None:
        raise InvalidArgument(
            f"`num_processes={num_processes}` conflicts with torchrun (WORLD_SIZE={env.world_size}); under torchrun "
            f"each process is one worker, so leave `num_processes` unset"
        )
    config, n, iterate_length = _check(batch_processor_cls, dataset, given, env.world_size if env is not None else None)
    dataset, inputs = bind_inputs(dataset, config.store, n)  # a TableDataset's rows, fixed for the whole run
    user = _pickle_user_code(batch_processor_cls, dataset, config.dataloader_kwargs)
    fresh = make_sharding(n, config.batch_size, config.num_processes, iterate_length=iterate_length,
                          drop_last=config.drop_last)
    spec = RunSpec(
        name=config.run_name, processor=_processor_name(batch_processor_cls), dataset_len=n,
        batch_size=config.batch_size, max_batches=config.max_batches, checkpoint_interval=config.checkpoint_interval,
        world_size=config.num_processes, planned_batches=fresh.planned_batches, real_batches=fresh.real_batches,
        on_error=config.on_error, max_failures=config.max_failures,
        output_root=outputs_folder(config.store),
        launch=config.launch, config=config.describe(), trust=trust, inputs=inputs,  # checked by `_check`
    )
    if env is not None:
        return torchrun.run(config, spec, user, _reporter(progress, config.store), env)
    from nbbatch._launch.local import run_local

    return run_local(config, spec, user, _reporter(progress, config.store))
