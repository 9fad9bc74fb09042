"""`torch_batch_process`: check the arguments, plan the shards, launch the workers, return a Run.

All validation happens here, in the caller's process, before any worker starts, so errors and
warnings show up where the user called (a notebook cell, a script line). Determined's helper
names (`_validate_dataloader_kwargs`, `_validate_iterate_length`) stay module-level, as there.
"""

from __future__ import annotations

import collections.abc
import inspect
import logging
import math
import os
import signal
import sys
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import cloudpickle
import torch
from torch.utils.data import IterableDataset

from nbbatch._errors import InvalidArgument, InvalidDataset, StoreError
from nbbatch._plan import make_sharding
from nbbatch._progress import NullReporter, Reporter, terminal_reporter
from nbbatch._run import Run, default_store
from nbbatch._store.control import clear_stop
from nbbatch._store.schema import check_run_name, outputs_folder
from nbbatch._store.writer import RunSpec, StoreWriter
from nbbatch._table import bind_inputs

__all__ = ["RunConfig", "torch_batch_process"]

logger = logging.getLogger("nbbatch")

DEFAULT_BATCH_SIZE = 1

OnError = Literal["raise", "skip"]


@dataclass(frozen=True)
class RunConfig:
    """The validated options of one call; the magic and the CLI only parse into this."""

    batch_size: int
    max_batches: int | None
    checkpoint_interval: int
    dataloader_kwargs: dict[str, Any]
    num_processes: int
    store: str
    run_name: str | None
    on_error: OnError
    max_failures: int | None
    batch_timeout: float | None
    drop_last: bool
    launch: dict[str, Any] | None = field(default=None)

    def describe(self) -> dict[str, Any]:
        """JSON-friendly view for the store (dataloader kwargs as reprs)."""
        out = asdict(self)
        out["dataloader_kwargs"] = {k: repr(v) for k, v in self.dataloader_kwargs.items()}
        return out


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


def _positive_int(name: str, value: Any, allow_none: bool = False, minimum: int = 1) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"`{name}` must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidArgument(f"`{name}` must be >= {minimum}, got {value}")
    return value


def _check_timeout(batch_timeout: Any) -> None:
    """A finite positive number of seconds, or None; NaN would compare False and disable the timeout."""
    if batch_timeout is None:
        return
    if isinstance(batch_timeout, bool) or not isinstance(batch_timeout, (int, float)) or not (
        math.isfinite(batch_timeout) and batch_timeout > 0
    ):
        raise InvalidArgument(
            f"`batch_timeout` must be a finite positive number of seconds, or None for no limit; got {batch_timeout!r}"
        )


def _check_trust(trust: Any) -> bool:
    if not isinstance(trust, bool):
        raise InvalidArgument(f"`trust` must be True or False, got {trust!r}")
    return trust


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
    batch_processor_cls: Any,
    dataset: Any,
    batch_size: int | None,
    max_batches: int | None,
    checkpoint_interval: int,
    dataloader_kwargs: dict[str, Any] | None,
    num_processes: int | None,
    store: str | None,
    run_name: str | None,
    on_error: str,
    max_failures: int | None,
    batch_timeout: float | None,
    launch: dict[str, Any] | None,
    world_size: int | None,
) -> tuple[RunConfig, int, int]:
    """Validate everything; returns the config, dataset length and iterate length."""
    if isinstance(checkpoint_interval, bool) or not isinstance(checkpoint_interval, int) or checkpoint_interval <= 0:
        raise InvalidArgument("checkpoint_interval should be a positive integer")
    kwargs = dict(dataloader_kwargs or {})
    _validate_dataloader_kwargs(kwargs, batch_size)
    if batch_size is None:
        batch_size = kwargs.pop("batch_size", DEFAULT_BATCH_SIZE)
    _positive_int("batch_size", batch_size)
    assert batch_size is not None
    _check_processor(batch_processor_cls)
    if isinstance(dataset, IterableDataset):
        raise InvalidArgument(
            "IterableDatasets are not supported: nbbatch shards by index; wrap the data in a map-style "
            "Dataset with `__len__` and `__getitem__`"
        )
    if not isinstance(dataset, collections.abc.Sized):
        raise InvalidDataset("Dataset must implement __len__()")
    n = len(dataset)
    if world_size is None:
        world_size = _positive_int("num_processes", num_processes if num_processes is not None else _default_processes())
    assert world_size is not None
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)):
        raise InvalidArgument(f"`max_batches` must be an integer or None, got {max_batches!r}")
    iterate_length = _validate_iterate_length(max_batches, math.ceil(n / batch_size / world_size))
    if on_error not in ("raise", "skip"):
        raise InvalidArgument(f"`on_error` must be \"raise\" or \"skip\", got {on_error!r}")
    _positive_int("max_failures", max_failures, allow_none=True, minimum=0)
    _check_timeout(batch_timeout)
    if run_name is not None:
        check_run_name(run_name)
    store = os.path.abspath(os.fspath(store) if store is not None else default_store())
    if os.path.isdir(store):
        raise InvalidArgument(f"`store` must be a file path such as `{os.path.join(store, 'nbbatch.duckdb')}`, not a folder")
    config = RunConfig(
        batch_size=batch_size, max_batches=max_batches, checkpoint_interval=checkpoint_interval,
        dataloader_kwargs=kwargs, num_processes=world_size, store=store, run_name=run_name,
        on_error=on_error,  # type: ignore[arg-type]
        max_failures=max_failures, batch_timeout=batch_timeout, drop_last=bool(kwargs.get("drop_last", False)),
        launch=launch,
    )
    return config, n, iterate_length


def _reporter(progress: bool | Reporter) -> Reporter:
    if progress is False or progress is None:
        return NullReporter()
    if progress is not True:
        return progress
    try:
        from IPython import get_ipython

        shell = get_ipython()
    except ImportError:  # pragma: no cover - IPython is a dependency
        shell = None
    if shell is not None and type(shell).__name__ == "ZMQInteractiveShell":
        from nbbatch._ui.widgets import widget_reporter

        reporter: Reporter = widget_reporter()
        return reporter
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
    config, n, iterate_length = _check(
        batch_processor_cls, dataset, batch_size, max_batches, checkpoint_interval, dataloader_kwargs,
        num_processes, None if store is None else os.fspath(store), run_name, on_error, max_failures,
        batch_timeout, launch, env.world_size if env is not None else None,
    )
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
        launch=config.launch, config=config.describe(), trust=_check_trust(trust), inputs=inputs,
    )
    if env is not None:
        run: Run = torchrun.run(config, spec, user, fresh, _reporter(progress), env)
        return run
    return _run_local(config, spec, user, _reporter(progress))


def _run_local(config: RunConfig, spec: RunSpec, user: bytes, reporter: Reporter) -> Run:
    from nbbatch._launch.attempt import attempt_spec
    from nbbatch._launch.local import launch_local

    writer = StoreWriter(config.store)
    try:
        record = writer.begin(spec)
        clear_stop(writer.path, record.run_id)
        if record.status == "done":
            logger.info("run %r is already done in %s; returning it as is", record.name, config.store)
            return Run(config.store, record.run_id)
        sharding, worker_spec = attempt_spec(config, spec.dataset_len, config.num_processes, user, record)
        try:
            outcome = launch_local(worker_spec, record, sharding, writer, reporter, batch_timeout=config.batch_timeout)
        except BaseException as exc:
            _finish_quietly(writer, record, "failed", f"{type(exc).__name__}: {exc}")
            raise
        if outcome.error is None:
            writer.finish(record, outcome.status, outcome.reduced, None)
        else:  # the run's own error (a full disk, say) is the one to raise, not a failing status update
            _finish_quietly(writer, record, outcome.status, str(outcome.error), outcome.reduced)
        if outcome.used_upload_path:
            logger.info("Files stored with default paths are at: %s", record.output_dir)
    finally:
        writer.close()
    run = Run(config.store, record.run_id)
    if outcome.error is not None:
        raise outcome.error
    if outcome.interrupted_by == signal.SIGINT:
        raise KeyboardInterrupt(f"run {record.name!r} preempted and committed; resume with run_name={record.name!r}")
    if outcome.interrupted_by == signal.SIGTERM:
        sys.exit(128 + signal.SIGTERM)
    return run


def _finish_quietly(
    writer: StoreWriter, record: Any, status: str, error: str, reduced: dict[str, Any] | None = None
) -> None:
    """Set the final status of a run that already has an error to raise; a failure here is only logged.

    The run's own error (a full disk, say) is what the caller raises. When the store refuses the
    status too, `StoreWriter.finish` keeps it in the lock file and its message says so.
    """
    try:
        writer.finish(record, status, reduced, error)
    except StoreError as exc:
        logger.warning("nbbatch: %s", exc)


