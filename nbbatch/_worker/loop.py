"""The batch loop of one worker, with Determined's order of calls and checkpoint cadence.

The same loop runs under the local launcher (events go down a pipe) and under torchrun (events
reach rank 0 through torch.distributed). It owns the worker's `Ledger`: the context user code
holds reports into it, and the loop reads it at batches, checkpoints and the end.
Must not import DuckDB, ``_launch`` or ``_ui``.
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, TypeVar

import cloudpickle
from torch.utils.data import DataLoader

from nbbatch._events import (
    BatchDone,
    BatchFailed,
    BatchStarted,
    CheckpointDone,
    Reduced,
    Status,
    WorkerFinished,
    WorkerReady,
)
from nbbatch._options import OnError
from nbbatch._plan import Sharding
from nbbatch._processor import Ledger, worker_context
from nbbatch._worker.collective import Coordinator
from nbbatch._worker.outputs import KeyCase, check_picklable, to_columns, unpicklable
from nbbatch._worker.segments import Segments, batch_bytes, settings
from nbbatch._worker.sink import NotSent, Sink, pickles
from nbbatch._worker.state import dump_state, load_state

__all__ = ["Sink", "WorkerSpec", "failure", "run_loop"]

logger = logging.getLogger("nbbatch")

_T = TypeVar("_T")

#: DataLoader options the plan decides: the loader gets one batch sampler of exactly the planned batches.
PLANNED_LOADER_KEYS = ("batch_size", "shuffle", "sampler", "batch_sampler", "drop_last")


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs. ``user`` is the cloudpickled ``(processor_cls, dataset,
    dataloader_kwargs)``: pickled once in the caller, so notebook classes travel by value and an
    unpicklable dataset fails there, not in a worker."""

    user: bytes
    sharding: Sharding
    done: frozenset[int]
    checkpoint_interval: int
    on_error: OnError
    max_failures: int | None
    output_dir: str
    prior_reducer_states: tuple[tuple[int, int, tuple[bytes, ...]], ...] = ()
    run_id: str = ""
    output_columns: tuple[str, ...] = ()  # stored by earlier flushes/attempts, for `KeyCase`
    attempt: int = 1  # names this attempt's output segments


class _Fatal(Exception):
    """A fatal worker error already reported as an event; unwinds the loop."""


def failure(rank: int, exc: BaseException, g: int | None = None, k: int | None = None,
            indices: range | tuple[int, ...] = (), fatal: bool = True) -> BatchFailed:
    """The event for ``exc``: raised in batch ``g`` (``batch_idx`` ``k``), or outside any batch when ``g`` is None."""
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


def _loader(spec: WorkerSpec, dataset: Any, dataloader_kwargs: dict[str, Any], todo: list[int]) -> Iterator[Any]:
    """The user's DataLoader over exactly this worker's planned batches."""
    kwargs = {k: v for k, v in dataloader_kwargs.items() if k not in PLANNED_LOADER_KEYS}
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
) -> Status:
    """Run one worker's share of the plan; returns `Status.DONE`, `Status.PREEMPTED` or `Status.FAILED`.

    A fatal error is reported to ``sink`` before this returns `Status.FAILED`; errors of the sink
    itself (a torchrun peer's `RemoteFailure`, a broken collective) propagate.
    """
    try:
        return _BatchLoop(spec, rank, local_rank, coordinator, sink, stop_requested).run()
    except _Fatal:
        return Status.FAILED


class _BatchLoop:
    """One worker's pass over its share: the state `run_loop` threads through batches and checkpoints."""

    def __init__(self, spec: WorkerSpec, rank: int, local_rank: int, coordinator: Coordinator, sink: Sink,
                 stop_requested: Callable[[], bool]) -> None:
        self.spec, self.rank, self.coordinator, self.sink = spec, rank, coordinator, sink
        self.stop_requested = stop_requested
        self.sharding = spec.sharding
        self.ledger = Ledger()
        self.context = worker_context(self.ledger, rank, spec.sharding.world_size, local_rank, spec.output_dir)
        self.todo = self.sharding.todo(rank, spec.done)
        self.keys = KeyCase(spec.output_columns)
        config = settings(spec.output_dir, spec.attempt)
        self.segments = Segments(config, spec.run_id, spec.attempt, rank) if config is not None else None
        self.failures = 0  # batches skipped under on_error="skip"
        self.sink_checks = pickles(sink)  # the sink's own pickling checks inline outputs: no second pickle
        # Outputs held after the batch (in a segment, or a sink that ships at checkpoints) are copied:
        # a sink that pickles at once has its own snapshot.
        self.keeps_outputs = self.segments is not None or not self.sink_checks
        self.processor: Any = None  # built by `run`, with the loader
        self.batches: Iterator[Any] = iter(())

    def _call(self, fn: Callable[[], _T]) -> _T:
        """``fn()``; an exception is this rank's fatal error outside a batch: reported, then the loop unwinds."""
        try:
            return fn()
        except Exception as exc:
            self.sink.emit(failure(self.rank, exc))
            raise _Fatal from exc

    def run(self) -> Status:
        """Build the processor and the loader, then every batch and checkpoint; raises `_Fatal` after reporting."""
        processor_cls, dataset, dataloader_kwargs = self._call(lambda: cloudpickle.loads(self.spec.user))
        self.processor = self._call(lambda: processor_cls(context=self.context))
        self.sink.emit(WorkerReady(rank=self.rank, pid=os.getpid(), host=socket.gethostname(), t=time.time()))
        self.batches = self._call(lambda: _loader(self.spec, dataset, dataloader_kwargs, self.todo))
        return self._steps()

    def _steps(self) -> Status:
        """Batches and checkpoints in Determined's cadence; the status this worker leaves with."""
        todo, interval = set(self.todo), self.spec.checkpoint_interval
        batch_idx = skip = self.sharding.start_batch_idx(self.spec.done)
        last_checkpoint = -1
        for batch_idx in range(skip, self.sharding.iterate_length):
            g = self.sharding.global_batch(self.rank, batch_idx)
            if g in todo:
                self._batch(g, batch_idx)
            if (batch_idx + 1) % interval == 0:
                stop, too_many = self._checkpoint(batch_idx + 1, check_stop=True)
                last_checkpoint = batch_idx
                if too_many:
                    return self._finished(Status.FAILED)
                if stop:
                    self._reduce()
                    return self._finished(Status.PREEMPTED)
        if batch_idx > last_checkpoint:
            _, too_many = self._checkpoint(self.sharding.iterate_length, check_stop=False)
            if too_many:
                return self._finished(Status.FAILED)
        self._reduce()
        self._call(self.processor.on_finish)
        return self._finished(Status.DONE)

    def _report(self, wait: bool = False) -> None:
        """Send the events of finished segment writes (all of them, waiting, when ``wait``)."""
        if self.segments is not None:
            for event in self._call(self.segments.drain if wait else self.segments.ready):
                self.sink.emit(event)

    def _finished(self, status: Status) -> Status:
        self._report(wait=True)  # a step's outputs are committed with their segment: report every one first
        self.sink.emit(WorkerFinished(self.rank, status, self.ledger.take_metrics(), self.ledger.used_upload_path))
        return status

    # -- one batch ---------------------------------------------------------------------------------
    def _batch(self, g: int, batch_idx: int) -> None:
        """Process global batch ``g`` and report it done or failed; raises `_Fatal` under ``on_error="raise"``."""
        indices = self.sharding.indices(g)
        self._report()
        started = time.time()
        self.sink.emit(BatchStarted(self.rank, g, batch_idx, started))
        self.ledger.global_batch = g
        try:
            value = self.processor.process_batch(batch=next(self.batches), batch_idx=batch_idx)
            columns = to_columns(value, len(indices), self.keys, copy=self.keeps_outputs)
            segmented = self._segmented(columns)
            if columns is not None and (segmented or not self.sink_checks):
                check_picklable(columns)  # else the pipe's own pickling checks them, once
        except Exception as exc:
            self._batch_failed(g, batch_idx, indices, exc)
            return
        inline = None if segmented else columns  # written by this worker; only the manifest goes to the launcher
        done = BatchDone(self.rank, g, batch_idx, len(indices), started, time.time() - started, inline,
                         self.ledger.take_metrics())
        try:
            self.sink.emit(done)
        except NotSent as exc:
            self._batch_failed(g, batch_idx, indices, unpicklable(inline, exc.__cause__ or exc))
            return
        self.keys.add(list(columns or ()))
        if segmented and self.segments is not None and columns is not None:
            self.segments.add(g, batch_idx, indices[0], columns)

    def _segmented(self, columns: dict[str, Any] | None) -> bool:
        """Whether this worker writes the batch's columns into its segment (else they travel inline)."""
        return bool(columns) and self.segments is not None and batch_bytes(columns or {}) >= self.segments.config.inline_bytes

    def _batch_failed(self, g: int, batch_idx: int, indices: range, exc: BaseException) -> None:
        """Report the batch's error; fatal (raises `_Fatal`) under ``on_error="raise"``, else counted and skipped."""
        fatal = self.spec.on_error == "raise"
        self.ledger.take_metrics()  # a failed batch's metrics are not committed
        if fatal:  # the steps already sealed still commit: their segments go first
            with suppress(_Fatal):
                self._report(wait=True)
        self.sink.emit(failure(self.rank, exc, g, batch_idx, indices, fatal))
        if fatal:
            raise _Fatal from exc
        self.failures += 1

    # -- checkpoints and the end ---------------------------------------------------------------------
    def _checkpoint(self, step: int, check_stop: bool) -> tuple[bool, bool]:
        """Checkpoint ``step`` on every rank: ``(stop here, too many failures)`` as the ranks agreed."""
        self._call(self.processor.on_checkpoint_start)
        self._report()  # a failed write of an earlier step is this rank's error, before any peer's broken collective
        stop, total_failures = self.coordinator.sync(check_stop and self.stop_requested(), self.failures)
        stop = stop and check_stop
        too_many = self.spec.max_failures is not None and total_failures > self.spec.max_failures
        states = self._call(lambda: tuple(dump_state(s) for s in self.ledger.per_slot_states()))
        segment = self.segments.seal(step) if self.segments is not None else False  # written while the next run
        self.sink.emit(CheckpointDone(self.rank, step, states, self.ledger.take_metrics(), stop=stop,
                                      failed=too_many, segment=segment))
        self.sink.flush(self.coordinator)
        logger.debug("Completed steps:  %d and checkpointing", step)
        return stop, too_many

    def _reduce(self) -> None:
        """Determined's ``_reduce_metrics``, plus the per-slot states committed by earlier attempts."""
        if not self.ledger.reducers:
            return
        per_slot = self._call(self.ledger.per_slot_states)
        gathered = self.coordinator.gather(per_slot)
        if gathered is not None:
            self.sink.emit(Reduced(self._call(lambda: self.ledger.reduce(self._prior_states() + list(gathered)))))

    def _prior_states(self) -> list[list[Any]]:
        """The per-slot states earlier attempts committed, one list per (attempt, rank)."""
        wrapped = len(self.ledger.reducers)
        prior = []
        for attempt, prior_rank, states in self.spec.prior_reducer_states:
            if len(states) != wrapped:
                raise RuntimeError(
                    f"attempt {attempt} rank {prior_rank} stored {len(states)} reducer states but the processor "
                    f"now wraps {wrapped} reducers; wrap the same reducers on every run of `run_name`"
                )
            prior.append([load_state(s) for s in states])  # the store verified their signatures
        return prior
