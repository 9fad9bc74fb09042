"""Joining a torchrun (torch.distributed) world: each process is one worker; rank 0 writes the store.

Rank 0 opens the `StoreWriter`, creates or resumes the run and broadcasts what the other ranks
need, or the error, raised as the same type on every rank so none hangs (``_open``). Then rank 0
runs as `Lead` (``nbbatch._launch.lead``) and the others as peers (``_run_peer``) that ship their
events at checkpoints and take the outcome from rank 0. Multi-node: only rank 0's machine holds the
store; ``upload_path`` files stay on each node's disk unless the output folder is on a shared file
system.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from dataclasses import dataclass
from typing import Any

from nbbatch._errors import InvalidArgument
from nbbatch._launch.attempt import attempt_spec
from nbbatch._launch.lead import Lead, broadcast, failed, lost, sendable, wait_errors
from nbbatch._launch.local import _Signals, default_threads
from nbbatch._plan import Sharding
from nbbatch._progress import Reporter
from nbbatch._run import Run
from nbbatch._store.control import clear_stop
from nbbatch._store.writer import RunRecord, RunSpec, StoreWriter
from nbbatch._worker.collective import Coordinator, TorchCoordinator
from nbbatch._worker.distributed import (
    ABORT_GRACE_SECONDS,
    Channel,
    PeerSink,
    PeerWatcher,
    RemoteFailure,
    join_group,
)
from nbbatch._worker.loop import WorkerSpec, run_loop

__all__ = ["TorchrunEnv", "environment", "run"]

logger = logging.getLogger("nbbatch")


@dataclass(frozen=True)
class TorchrunEnv:
    """The torch.distributed coordinates torchrun puts in the environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def environment() -> TorchrunEnv | None:
    """The torchrun coordinates, or None when not started by torchrun."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env and not ("MASTER_ADDR" in env and "RANK" in env and "WORLD_SIZE" in env):
        return None
    if env.get("NBBATCH_LOCAL_WORKER") == "1":
        return None
    world = int(env.get("WORLD_SIZE", "1"))
    return TorchrunEnv(
        rank=int(env.get("RANK", "0")),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
    )


@dataclass(frozen=True)
class _Start:
    """What rank 0 broadcasts once the store answered."""

    run_id: str
    name: str
    attempt: int
    status: str
    planned_batches: int
    output_dir: str
    done: frozenset[int]
    reducer_states: tuple[tuple[int, int, tuple[bytes, ...]], ...]
    output_columns: tuple[str, ...] = ()


def _open(config: Any, spec: RunSpec, coordinator: Coordinator, group: Any) -> tuple[_Start, StoreWriter | None, RunRecord | None]:
    """Rank 0 opens the store and begins the run; every rank gets the answer or raises its error."""
    fingerprints = coordinator.gather((spec.dataset_len, spec.batch_size, spec.processor, spec.max_batches))
    if coordinator.rank != 0:
        answer = broadcast(None, group)
        if isinstance(answer, BaseException):
            raise answer
        return answer, None, None
    writer = None
    try:
        assert fingerprints is not None
        for rank, fp in enumerate(fingerprints):
            if fp != fingerprints[0]:
                raise InvalidArgument(
                    f"rank {rank} built (dataset_len, batch_size, processor, max_batches)={fp} but rank 0 built "
                    f"{fingerprints[0]}; every torchrun process must build the same processor and dataset"
                )
        writer = StoreWriter(config.store)
        record = writer.begin(spec)
        clear_stop(writer.path, record.run_id)
    except BaseException as exc:
        if writer is not None:
            writer.close()
        broadcast(sendable(exc), group)
        raise
    start = _Start(record.run_id, record.name, record.attempt, record.status, record.planned_batches,
                   record.output_dir, record.done, record.reducer_states, record.output_columns)
    broadcast(start, group)
    return start, writer, record


def run(config: Any, spec: RunSpec, user: bytes, sharding: Sharding, reporter: Reporter, env: TorchrunEnv) -> Run:
    """Run this process's share of the plan as rank ``env.rank`` of the torchrun world."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(default_threads(env.local_world_size))
    group, created = join_group(env.local_rank)
    coordinator = TorchCoordinator(group)
    start, writer, record = _open(config, spec, coordinator, group)
    if start.status == "done":
        if writer is not None:
            logger.info("run %r is already done in %s; returning it as is", start.name, config.store)
            writer.close()
        _leave_group(created)
        return Run(config.store, start.run_id)
    sharding, worker_spec = attempt_spec(config, spec.dataset_len, env.world_size, user, start)
    channel = Channel(dist.distributed_c10d._get_default_store(), start.run_id, start.attempt, env.world_size)
    signals = _Signals()
    with signals.installed():
        if writer is not None and record is not None:
            lead = Lead(config, record, sharding, writer, reporter, channel)
            status, error = lead.run(worker_spec, env.local_rank, coordinator, group, signals)
        else:
            status, error = _run_peer(worker_spec, env, coordinator, group, channel, signals, start.name)
    if error is not None:
        raise error
    _leave_group(created)
    if signals.count and status == "preempted":
        if signals.last == signal.SIGINT:
            raise KeyboardInterrupt(f"run {start.name!r} preempted and committed; resume with run_name={start.name!r}")
        sys.exit(128 + signal.SIGTERM)
    return Run(config.store, start.run_id)


def _leave_group(created: bool) -> None:
    """Destroy the process group nbbatch created, once every rank is past its last collective.

    Left to interpreter teardown, gloo's worker threads still hold work objects whose tensors take
    the GIL while Python is being torn down, and the rank aborts (``terminate called without an
    active exception``, SIGABRT) after a finished run, so torchrun reports the job failed. Only on
    clean ends: after an error a peer may still sit in a collective, and the process leaves anyway.
    A group the caller created is the caller's to destroy.
    """
    import torch.distributed as dist

    if created and dist.is_initialized():
        dist.destroy_process_group()


def _run_peer(
    spec: WorkerSpec, env: TorchrunEnv, coordinator: Coordinator, group: Any, channel: Channel, signals: _Signals,
    name: str,
) -> tuple[str, BaseException | None]:
    """A rank other than 0: run the loop, ship events at checkpoints, take the outcome from rank 0."""
    sink = PeerSink(env.rank, channel)
    finished = threading.Event()
    channel.publish_progress(env.rank, sink.counters())
    watcher = PeerWatcher(env.rank, channel, sink, finished).start()
    try:
        try:
            run_loop(spec, env.rank, env.local_rank, coordinator, sink, lambda: bool(signals.count))
            if sink.fatal is not None:
                # Our own error: never enter another collective; wait until rank 0 stored it.
                channel.wait_ack(env.rank, ABORT_GRACE_SECONDS)
                return "failed", failed(sink.fatal, name)
            sink.flush(coordinator)
            status, error = broadcast(None, group)
            return str(status), error
        except RemoteFailure as exc:
            return "failed", failed(exc.event, name)
        except Exception as exc:  # a collective broke: another rank failed or died
            errors = wait_errors(channel, env.rank)
            return "failed", failed(errors[min(errors)], name) if errors else lost(env.rank, exc, name)
    finally:
        try:
            channel.publish_progress(env.rank, sink.counters())
        except Exception:
            pass
        finished.set()
        # Not left running into interpreter teardown: a daemon thread inside a c10d store call then
        # cannot take the GIL back, and the rank aborts.
        watcher.thread.join(ABORT_GRACE_SECONDS)


