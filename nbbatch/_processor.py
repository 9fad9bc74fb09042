"""The user-facing classes of Determined's API: processor, context, metric reducers.

Texts of Determined's assertions and errors are kept verbatim (typos included) so that code and
tests written against ``determined.pytorch`` behave the same. Must not import ``_launch``,
``_store`` or ``_ui``.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
import logging
import pathlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from nbbatch._errors import InvalidArgument
from nbbatch._events import MetricRecord

__all__ = [
    "Ledger",
    "MetricReducer",
    "TorchBatchProcessor",
    "TorchBatchProcessorContext",
    "get_default_device",
    "worker_context",
]

logger = logging.getLogger("nbbatch")


class MetricReducer(metaclass=abc.ABCMeta):
    """Reduces a metric across batches and workers (Determined's ``pytorch.MetricReducer``).

    Implement ``reset``, ``per_slot_reduce`` (a picklable value per worker) and
    ``cross_slot_reduce`` (the list of those values, rank 0 first, to the final value). Define
    your own ``update`` and call it from ``process_batch``.

    Example:
        >>> class Sum(MetricReducer):
        ...     def __init__(self): self.reset()
        ...     def reset(self): self.total = 0
        ...     def update(self, x): self.total += x
        ...     def per_slot_reduce(self): return self.total
        ...     def cross_slot_reduce(self, per_slot): return sum(per_slot)
    """

    @abc.abstractmethod
    def reset(self) -> None:
        """Reset state for another set of values."""

    @abc.abstractmethod
    def per_slot_reduce(self) -> Any:
        """Return this worker's picklable intermediate value."""

    @abc.abstractmethod
    def cross_slot_reduce(self, per_slot_metrics: list[Any]) -> Any:
        """Combine the per-worker values into the final metric (a dict if wrapped without a name)."""


class _SimpleReducer(MetricReducer):
    """A reduction function over every ``update()``d value, in global batch order.

    Determined rebuilds the order by interleaving ranks; nbbatch tags each value with its global
    batch instead, so the order also survives a resume with another worker count.
    """

    def __init__(self, fn: Callable[[list[Any]], Any], context: TorchBatchProcessorContext | None = None) -> None:
        self.fn = fn
        self._context = context
        self._seq = itertools.count()
        self.reset()

    def reset(self) -> None:
        self.values: list[tuple[int, int, Any]] = []

    def update(self, value: Any) -> None:
        """Record one value (typically one per batch)."""
        global_batch = self._context._ledger.global_batch if self._context is not None else -1
        self.values.append((global_batch, next(self._seq), value))

    def per_slot_reduce(self) -> Any:
        return self.values

    def cross_slot_reduce(self, per_slot_metrics: list[Any]) -> Any:
        tagged = [item for slot in per_slot_metrics for item in slot]
        tagged.sort(key=lambda item: (item[0], item[1]))
        return self.fn([value for _, _, value in tagged])

    def __getstate__(self) -> dict[str, Any]:
        # The context is process-local; counters restart in the receiving process.
        state = self.__dict__.copy()
        state["_context"] = None
        state["_seq"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._seq = itertools.count()


class _WrappedReducer:
    """A registered reducer with Determined's error wrapping."""

    def __init__(self, reducer: MetricReducer, name: str | None, for_training: bool, for_validation: bool) -> None:
        self.reducer = reducer
        self.name = name
        self.for_training = for_training
        self.for_validation = for_validation

    def _fail(self, call: str) -> ValueError:
        return ValueError(f'reducer of type {type(self.reducer).__name__} for name="{self.name}" failed in a call to {call}')

    def reset(self) -> None:
        try:
            self.reducer.reset()
        except Exception as exc:
            raise self._fail("reset()") from exc

    def per_slot_reduce(self) -> Any:
        try:
            return self.reducer.per_slot_reduce()
        except Exception as exc:
            raise self._fail("per_slot_reduce()") from exc

    def cross_slot_reduce(self, per_slot_metrics: list[Any]) -> Any:
        try:
            return self.reducer.cross_slot_reduce(per_slot_metrics)
        except Exception as exc:
            raise self._fail(f"cross_slot_reduce() with per_slot_metrics={per_slot_metrics}") from exc


def _describe(reducer: MetricReducer) -> str:
    if isinstance(reducer, _SimpleReducer):
        return f"function {getattr(reducer.fn, '__name__', repr(reducer.fn))}()"
    return f"MetricReducer {type(reducer).__name__}"


def run_cross_slot_reduction(wrapped: list[_WrappedReducer], gathered: list[list[Any]]) -> dict[str, Any]:
    """Reduce per-slot values (one list per slot, in registration order) into one metrics dict."""
    metrics: dict[str, Any] = {}
    for w, per_slot in zip(wrapped, zip(*gathered)):
        value = w.cross_slot_reduce(list(per_slot))
        what = _describe(w.reducer)
        if w.name is None:
            if not isinstance(value, dict):
                done = "return a dict" if isinstance(w.reducer, _SimpleReducer) else "return return a dict"
                raise AssertionError(
                    f"The custom reduction {what} was wrapped by a call to wrap_reducer() with name=None "
                    f"but it did not {done} (it returned a {type(value).__name__}). Either return a dict "
                    f"of metric names to values or pass a name to wrap_reducer()."
                )
            metrics.update(value)
        else:
            if isinstance(value, dict):
                raise AssertionError(
                    f'The custom reduction {what} was wrapped by a call to wrap_reducer() with name="{w.name}" '
                    f"but it returned a dict anyway. Please leave name=None to return a dict of metrics, "
                    f"or return a single value."
                )
            metrics[w.name] = value
    return metrics


def get_default_device(local_rank: int = 0) -> torch.device:
    """``cuda:<local_rank>`` when GPUs exist, else ``cpu`` (one process per GPU)."""
    if torch.cuda.device_count() == 0:
        return torch.device("cpu")
    return torch.device(f"cuda:{local_rank}")


def to_device(data: Any, device: torch.device, warned_types: set[type] | None = None) -> Any:
    """Move tensors (and numpy arrays) in nested dicts/lists/tuples to ``device``."""
    if warned_types is None:
        warned_types = set()
    if isinstance(data, dict):
        return {name: to_device(d, device, warned_types) for name, d in data.items()}
    if isinstance(data, list):
        return [to_device(d, device, warned_types) for d in data]
    if isinstance(data, tuple):
        return tuple(to_device(d, device, warned_types) for d in data)
    if isinstance(data, np.ndarray) and data.dtype.kind in "fciub":
        return torch.from_numpy(data).to(device)
    if hasattr(data, "to") and callable(data.to):
        return data.to(device)
    if type(data) not in warned_types:
        warned_types.add(type(data))
        logger.warning("Was not able to move data item of type '%s' to device.", type(data).__name__)
    return data


class TorchBatchProcessorContext:
    """Per-worker helpers handed to ``TorchBatchProcessor.__init__(context)``.

    Attributes:
        device: ``cuda:<local_rank>`` when GPUs exist, else ``cpu``.
    """

    def __init__(
        self,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        output_dir: str | pathlib.Path = ".",
        device: torch.device | None = None,
    ) -> None:
        self._rank = rank
        self._world_size = world_size
        self._local_rank = local_rank
        self._output_dir = pathlib.Path(output_dir)
        self._storage_path = self._output_dir / f"rank_{rank}"
        self._tensorboard_path = self._output_dir / "tensorboard" / f"rank_{rank}"
        self.device = device if device is not None else get_default_device(local_rank)
        self._ledger = Ledger()
        self._hparams: dict[str, Any] = {}

    # -- Determined API -------------------------------------------------------------------------
    def to_device(self, data: Any, warned_types: set[type] | None = None) -> Any:
        """Move ``data`` (nested dict/list/tuple of tensors or numpy arrays) to ``self.device``."""
        return to_device(data, self.device, warned_types)

    def prepare_model_for_inference(self, model: torch.nn.Module) -> torch.nn.Module:
        """Call ``model.eval()`` and move it to ``self.device``; returns the same object."""
        model.eval()
        model.to(self.device)
        return model

    def wrap_reducer(
        self,
        reducer: MetricReducer | Callable[[list[Any]], Any],
        name: str | None = None,
        for_training: bool = True,
        for_validation: bool = True,
    ) -> MetricReducer:
        """Register a reducer; its result lands in ``Run.reduced_metrics`` at the end.

        A plain function receives every ``update()``d value in global batch order. A
        ``MetricReducer`` is reduced with its own ``per_slot_reduce``/``cross_slot_reduce``.
        """
        if reducer in [w.reducer for w in self._ledger.reducers]:
            raise AssertionError(
                f"Detected the same reducer of type {type(reducer).__name__} in context.wrap_reducer(), "
                "please avoid calling wrap_reducer() on the same reducer object twice."
            )
        if not isinstance(reducer, MetricReducer):
            if callable(reducer):
                reducer = _SimpleReducer(reducer, self)
            else:
                raise AssertionError(
                    f"Detected invalid reducer in wrap_reducer() of type {type(reducer).__name__}. Reducers "
                    "must either be a function or a subclass of pytorch.MetricReducer."
                )
        self._ledger.reducers.append(_WrappedReducer(reducer, name, for_training, for_validation))
        return reducer

    @contextlib.contextmanager
    def upload_path(self) -> Iterator[pathlib.Path]:
        """Yield this worker's folder in the run's output dir (``<output_dir>/rank_<r>``).

        Files written there are at-least-once: after a resume, batches after the last checkpoint
        are processed again, so name files by ``batch_idx`` to overwrite instead of duplicating.
        """
        self._ledger.used_upload_path = True
        self._storage_path.mkdir(parents=True, exist_ok=True)
        yield self._storage_path

    def get_tensorboard_path(self) -> pathlib.Path:
        """A per-worker TensorBoard folder inside the run's output dir."""
        self._tensorboard_path.mkdir(parents=True, exist_ok=True)
        return self._tensorboard_path

    def report_metrics(self, group: str, steps_completed: int, metrics: dict[str, Any]) -> None:
        """Store metrics with the current batch (committed with it, exactly once)."""
        if not isinstance(group, str) or "." in group:
            raise InvalidArgument(f"metric group {group!r} must be a string without '.'; e.g. `group=\"inference\"`")
        if not isinstance(metrics, dict):
            raise InvalidArgument(f"`metrics` must be a dict of name to value, got {type(metrics).__name__}")
        self._ledger.metrics.append(
            MetricRecord(group, int(steps_completed), tuple((str(k), _plain(v)) for k, v in metrics.items()), time.time())
        )

    def get_distributed_rank(self) -> int:
        """This worker's rank in ``[0, get_distributed_size())``."""
        return self._rank

    def get_distributed_size(self) -> int:
        """Number of workers in this run."""
        return self._world_size

    def get_hparams(self) -> dict[str, Any]:
        """Hyperparameters; off-cluster there are none, so this is an empty dict."""
        return dict(self._hparams)

    def report_task_using_model_version(self, model_version: Any) -> None:
        """Determined links trials to registry models; nbbatch has no registry, so this only logs."""
        logger.info("report_task_using_model_version(%r) ignored: nbbatch has no model registry", model_version)

    def report_task_using_checkpoint(self, checkpoint: Any) -> None:
        """Determined links trials to checkpoints; nbbatch has no registry, so this only logs."""
        logger.info("report_task_using_checkpoint(%r) ignored: nbbatch has no model registry", checkpoint)


def _plain(value: Any) -> Any:
    """Turn tensors and arrays into Python numbers/lists: they pickle cheaply, and a metric kept until its
    batch commits cannot change when the caller writes into the tensor again."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.item() if value.size == 1 else value.tolist()
    return value


def _plain_tree(value: Any) -> Any:
    """`_plain` through nested dicts, lists and tuples (reduced metrics)."""
    if isinstance(value, dict):
        return {k: _plain_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_tree(v) for v in value)
    return _plain(value)


class Ledger:
    """The engine's side of one context: what user code registered and reported through it.

    Not part of Determined's API. The batch loop owns one ledger per worker, builds the context
    around it (`worker_context`), and reads it at batches, checkpoints and the end; the context
    only writes into it.

    Attributes:
        reducers: the wrapped reducers, in registration order.
        metrics: ``report_metrics`` calls not yet taken by the loop.
        global_batch: the batch in ``process_batch`` now (tags function reducers' values); -1 outside.
        used_upload_path: whether user code asked for ``upload_path()``.
    """

    def __init__(self) -> None:
        self.reducers: list[_WrappedReducer] = []
        self.metrics: list[MetricRecord] = []
        self.global_batch = -1
        self.used_upload_path = False

    def take_metrics(self) -> tuple[MetricRecord, ...]:
        """The metrics reported since the last call (they travel with the next event)."""
        taken, self.metrics = tuple(self.metrics), []
        return taken

    def per_slot_states(self) -> list[Any]:
        """Each reducer's ``per_slot_reduce()`` value, in registration order."""
        return [w.per_slot_reduce() for w in self.reducers]

    def reduce(self, per_slot: list[list[Any]]) -> dict[str, Any]:
        """The final metrics from per-slot states (one list per slot), as plain Python values."""
        metrics = run_cross_slot_reduction(self.reducers, per_slot)
        return {str(k): _plain_tree(v) for k, v in metrics.items()}


def worker_context(
    ledger: Ledger, rank: int, world_size: int, local_rank: int, output_dir: str | pathlib.Path
) -> TorchBatchProcessorContext:
    """The context of one worker, reporting into ``ledger`` (the batch loop's)."""
    context = TorchBatchProcessorContext(rank, world_size, local_rank, output_dir, get_default_device(local_rank))
    context._ledger = ledger
    return context


class TorchBatchProcessor(metaclass=abc.ABCMeta):
    """Subclass this: build models in ``__init__(context)``, do the work in ``process_batch``.

    ``process_batch`` may return outputs: a tensor (column ``output``) or a dict of per-sample
    tensors/arrays/lists, stored one row per sample in DuckDB. Returning None stores nothing.

    Example:
        >>> class Double(TorchBatchProcessor):
        ...     def __init__(self, context): self.context = context
        ...     def process_batch(self, batch, batch_idx): return {"y": batch * 2}
    """

    @abc.abstractmethod
    def __init__(self, context: TorchBatchProcessorContext) -> None:
        """Create models, reducers and clients once per worker."""

    @abc.abstractmethod
    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        """Process one batch; ``batch_idx`` counts this worker's batches (not global)."""

    def on_checkpoint_start(self) -> None:
        """Called on every worker before each checkpoint (flush buffers here)."""

    def on_finish(self) -> None:
        """Called on every worker after the last checkpoint and the metric reduction."""
