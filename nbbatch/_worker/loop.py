"""The batch loop of one worker, with Determined's order of calls and checkpoint cadence.

The same loop runs under the local launcher (events go down a pipe) and under torchrun (events
reach rank 0 through torch.distributed). Must not import DuckDB, ``_launch`` or ``_ui``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import Any, Protocol

import cloudpickle
from torch.utils.data import DataLoader

from nbbatch._events import (
    BatchDone,
    BatchFailed,
    BatchStarted,
    CheckpointDone,
    Event,
    Reduced,
    WorkerFinished,
    WorkerReady,
)
from nbbatch._plan import Sharding
from nbbatch._processor import TorchBatchProcessorContext, _plain, get_default_device, run_cross_slot_reduction
from nbbatch._worker.collective import Coordinator
from nbbatch._worker.outputs import KeyCase, to_columns
from nbbatch._worker.segments import SegmentFailed, Segments, batch_bytes, settings
from nbbatch._worker.state import dump_state, load_state

__all__ = ["Sink", "WorkerSpec", "run_loop"]

logger = logging.getLogger("nbbatch")


class Sink(Protocol):
    """Where a worker's events go.

    A sink whose events leave only at `flush` (a torchrun peer's) has a class attribute
    ``immediate = False``; the loop then finishes each step's output segment before the step's
    checkpoint event, so the segment's manifest reaches the launcher with it.
    """

    def emit(self, event: Event) -> None:
        """Send one event (non-blocking in spirit)."""
        ...

    def flush(self, coordinator: Coordinator) -> None:
        """Called on every rank right after each checkpoint event (a collective point)."""
        ...


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs. ``user`` is the cloudpickled ``(processor_cls, dataset,
    dataloader_kwargs)``: pickled once in the caller, so notebook classes travel by value and an
    unpicklable dataset fails there, not in a worker."""

    user: bytes
    sharding: Sharding
    done: frozenset[int]
    checkpoint_interval: int
    on_error: str
    max_failures: int | None
    output_dir: str
    prior_reducer_states: tuple[tuple[int, int, tuple[bytes, ...]], ...] = ()
    run_id: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    output_columns: tuple[str, ...] = ()  # stored by earlier flushes/attempts, for `KeyCase`
    attempt: int = 1  # names this attempt's output segments


class _Fatal(Exception):
    """A fatal worker error already reported as an event; unwinds the loop."""


def _failure(rank: int, g: int | None, k: int | None, indices: range | tuple[int, ...], exc: BaseException, fatal: bool) -> BatchFailed:
    return BatchFailed(
        rank=rank,
        global_batch=g,
        batch_idx=k,
        indices=tuple(indices),
        exc_type=type(exc).__name__,
        message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        fatal=fatal,
        t=time.time(),
    )


def _loader(spec: WorkerSpec, dataset: Any, dataloader_kwargs: dict[str, Any], todo: list[int]) -> Any:
    kwargs = dict(dataloader_kwargs)
    for key in ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last"):
        kwargs.pop(key, None)
    batches = [list(spec.sharding.indices(g)) for g in todo]
    if kwargs.get("num_workers"):
        kwargs["worker_init_fn"] = functools.partial(_loader_worker_init, kwargs.get("worker_init_fn"))
    return iter(DataLoader(dataset, batch_sampler=batches, **kwargs))


def _loader_worker_init(user_init: Callable[[int], None] | None, worker_id: int) -> None:
    """In each DataLoader worker process: ignore SIGTERM, then run the user's ``worker_init_fn``.

    SLURM's preemption and container stops SIGTERM every process. torch's DataLoader workers die of
    a SIGTERM not sent by their parent, and the next batch then raised "DataLoader worker exited
    unexpectedly", failing a run that should be preempted. The nbbatch worker gets the same SIGTERM,
    stops at the next checkpoint, and shuts its DataLoader (and so these processes) down.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if user_init is not None:
        user_init(worker_id)


def run_loop(
    spec: WorkerSpec,
    rank: int,
    local_rank: int,
    coordinator: Coordinator,
    sink: Sink,
    stop_requested: Callable[[], bool],
) -> str:
    """Run one worker's share of the plan; returns ``done``, ``preempted`` or ``failed``."""
    sharding = spec.sharding
    world = sharding.world_size
    context = TorchBatchProcessorContext(
        rank=rank, world_size=world, local_rank=local_rank, output_dir=spec.output_dir,
        device=get_default_device(local_rank),
    )
    try:
        processor_cls, dataset, dataloader_kwargs = cloudpickle.loads(spec.user)
        processor = processor_cls(context=context)
    except Exception as exc:
        sink.emit(_failure(rank, None, None, (), exc, fatal=True))
        return "failed"
    sink.emit(WorkerReady(rank=rank, pid=os.getpid(), host=socket.gethostname(), t=time.time()))

    todo = sharding.todo(rank, spec.done)
    todo_set = set(todo)
    try:
        batches = _loader(spec, dataset, dataloader_kwargs, todo)
    except Exception as exc:
        sink.emit(_failure(rank, None, None, (), exc, fatal=True))
        return "failed"
    failures = 0
    keys = KeyCase(spec.output_columns)
    config = settings(spec.output_dir, spec.attempt)
    segments = Segments(config, spec.run_id, spec.attempt, rank) if config is not None else None

    def report(wait: bool = False) -> None:
        """Send the events of finished segment writes (all of them, waiting, when ``wait``)."""
        if segments is None:
            return
        try:
            for event in segments.drain() if wait else segments.ready():
                sink.emit(event)
        except SegmentFailed as exc:
            sink.emit(_failure(rank, None, None, (), exc, fatal=True))
            raise _Fatal from exc

    def finished(status: str) -> str:
        report(wait=True)  # a step's outputs are committed with their segment: report every one first
        sink.emit(WorkerFinished(rank, status, context._take_metrics(), context._use_default_storage))
        return status

    skip = sharding.start_batch_idx(spec.done)
    last_checkpoint = -1
    batch_idx = skip

    def checkpoint(step: int, check_stop: bool) -> tuple[bool, bool]:
        nonlocal failures
        try:
            processor.on_checkpoint_start()
        except Exception as exc:
            sink.emit(_failure(rank, None, None, (), exc, fatal=True))
            raise _Fatal from exc
        report()  # a failed write of an earlier step is this rank's error, before any peer's broken collective
        stop, total_failures = coordinator.sync(check_stop and stop_requested(), failures)
        too_many = spec.max_failures is not None and total_failures > spec.max_failures
        try:
            states = tuple(dump_state(w.per_slot_reduce()) for w in context._wrapped_reducers)
        except Exception as exc:
            sink.emit(_failure(rank, None, None, (), exc, fatal=True))
            raise _Fatal from exc
        segment = segments.seal(step) if segments is not None else False
        if segment and not getattr(sink, "immediate", True):
            report(wait=True)  # a sink that ships at checkpoints: the segment's manifest goes with this one
        sink.emit(CheckpointDone(rank, step, states, context._take_metrics(), stop=stop and check_stop, failed=too_many,
                                 segment=segment))
        sink.flush(coordinator)
        logger.debug("Completed steps:  %d and checkpointing", step)
        return stop and check_stop, too_many

    try:
        for batch_idx in range(skip, sharding.iterate_length):
            g = sharding.global_batch(rank, batch_idx)
            if g in todo_set:
                indices = sharding.indices(g)
                report()
                started = time.time()
                sink.emit(BatchStarted(rank, g, batch_idx, started))
                context._global_batch = g
                try:
                    batch = next(batches)
                    value = processor.process_batch(batch=batch, batch_idx=batch_idx)
                    columns = to_columns(value, len(indices), keys)
                except Exception as exc:
                    fatal = spec.on_error == "raise"
                    context._take_metrics()
                    if fatal:  # the steps already sealed still commit: their segments go first
                        with suppress(_Fatal):
                            report(wait=True)
                    sink.emit(_failure(rank, g, batch_idx, indices, exc, fatal=fatal))
                    if fatal:
                        return "failed"
                    failures += 1
                else:
                    keys.add(list(columns or ()))
                    if columns and segments is not None and batch_bytes(columns) >= segments.config.inline_bytes:
                        segments.add(g, batch_idx, indices[0], columns)
                        columns = None  # written by this worker; only the manifest goes to the launcher
                    sink.emit(
                        BatchDone(rank, g, batch_idx, len(indices), started, time.time() - started, columns,
                                  context._take_metrics())
                    )
            if (batch_idx + 1) % spec.checkpoint_interval == 0:
                stop, too_many = checkpoint(batch_idx + 1, check_stop=True)
                last_checkpoint = batch_idx
                if too_many:
                    return finished("failed")
                if stop:
                    _reduce(spec, rank, context, coordinator, sink)
                    return finished("preempted")
        if batch_idx > last_checkpoint:
            _, too_many = checkpoint(sharding.iterate_length, check_stop=False)
            if too_many:
                return finished("failed")
        _reduce(spec, rank, context, coordinator, sink)
        try:
            processor.on_finish()
        except Exception as exc:
            sink.emit(_failure(rank, None, None, (), exc, fatal=True))
            return "failed"
        return finished("done")
    except _Fatal:
        return "failed"


def _reduce(spec: WorkerSpec, rank: int, context: TorchBatchProcessorContext, coordinator: Coordinator, sink: Sink) -> None:
    """Determined's ``_reduce_metrics``, plus the per-slot states committed by earlier attempts."""
    wrapped = context._wrapped_reducers
    if not wrapped:
        return
    try:
        per_slot = [w.per_slot_reduce() for w in wrapped]
    except Exception as exc:
        sink.emit(_failure(rank, None, None, (), exc, fatal=True))
        raise _Fatal from exc
    gathered = coordinator.gather(per_slot)
    if gathered is None:
        return
    try:
        prior = []
        for attempt, prior_rank, states in spec.prior_reducer_states:
            if len(states) != len(wrapped):
                raise RuntimeError(
                    f"attempt {attempt} rank {prior_rank} stored {len(states)} reducer states but the processor "
                    f"now wraps {len(wrapped)} reducers; wrap the same reducers on every run of `run_name`"
                )
            prior.append([load_state(s) for s in states])  # the store verified their signatures
        metrics = run_cross_slot_reduction(wrapped, prior + list(gathered))
    except Exception as exc:
        sink.emit(_failure(rank, None, None, (), exc, fatal=True))
        raise _Fatal from exc
    sink.emit(Reduced({str(k): _plain_tree(v) for k, v in metrics.items()}))


def _plain_tree(value: Any) -> Any:
    """Tensors and numpy values inside reduced metrics become Python values (cheap to pickle)."""
    if isinstance(value, dict):
        return {k: _plain_tree(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain_tree(v) for v in value)
    return _plain(value)


