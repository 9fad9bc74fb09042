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
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nbbatch._errors import InvalidArgument
from nbbatch._events import Status
from nbbatch._launch.attempt import attempt_spec
from nbbatch._launch.lead import Lead, broadcast, lost, sendable, wait_errors
from nbbatch._launch.lifecycle import Lifecycle, Signals, begin, conclude, worker_failed
from nbbatch._launch.local import default_threads
from nbbatch._progress import Reporter
from nbbatch._run import Run
from nbbatch._store.records import RunRecord, RunSpec
from nbbatch._store.writer import StoreWriter
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

if TYPE_CHECKING:
    from nbbatch._options import RunConfig

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


def _open(store: str, spec: RunSpec, coordinator: Coordinator, group: Any) -> tuple[RunRecord, StoreWriter | None]:
    """Rank 0 begins the run; every rank gets its record (rank 0 also the open writer) or raises its error."""
    fingerprints = coordinator.gather(spec.fingerprint)
    if coordinator.rank != 0:
        answer = broadcast(None, group)
        if isinstance(answer, BaseException):
            raise answer
        return answer, None
    writer = None
    try:
        assert fingerprints is not None
        for rank, fp in enumerate(fingerprints):
            if fp != fingerprints[0]:
                raise InvalidArgument(
                    f"rank {rank} built {fp} but rank 0 built {fingerprints[0]}; every torchrun process must "
                    f"build the same processor and dataset"
                )
        writer, record = begin(store, spec)
    except BaseException as exc:
        broadcast(sendable(exc), group)
        raise
    broadcast(record, group)
    return record, writer


@dataclass(frozen=True)
class _World:
    """This process's place in the torchrun world, and the means to talk to the other ranks."""

    env: TorchrunEnv
    group: Any
    coordinator: Coordinator
    channel: Channel


def run(config: RunConfig, spec: RunSpec, user: bytes, reporter: Reporter, env: TorchrunEnv) -> Run:
    """Run this process's share of the plan as rank ``env.rank`` of the torchrun world."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(default_threads(env.local_world_size))
    group, created = join_group(env.local_rank)
    coordinator = TorchCoordinator(group)
    record, writer = _open(config.store, spec, coordinator, group)
    if record.status == Status.DONE:
        _leave_group(created)
        return Run(config.store, record.run_id)
    sharding, worker_spec = attempt_spec(config, spec.dataset_len, env.world_size, user, record)
    channel = Channel(dist.distributed_c10d._get_default_store(), record.run_id, record.attempt, env.world_size)
    world = _World(env, group, coordinator, channel)
    signals = Signals()
    with signals.installed():
        if writer is None:
            status, error = _run_peer(worker_spec, world, signals, record.name)
        else:
            try:
                life = Lifecycle(record, sharding, writer, reporter, config.batch_timeout)
                status, error, consistent = Lead(life, channel).run(worker_spec, env.local_rank, coordinator, signals)
            finally:
                writer.close()
            if consistent:
                broadcast((status, sendable(error) if error is not None else None), group)
    if error is not None:
        raise error
    _leave_group(created)
    conclude(status, error, signals, record.name)
    return Run(config.store, record.run_id)


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


def _run_peer(spec: WorkerSpec, world: _World, signals: Signals, name: str) -> tuple[Status, BaseException | None]:
    """A rank other than 0: run the loop, ship events at checkpoints, take the outcome from rank 0."""
    rank, channel = world.env.rank, world.channel
    sink = PeerSink(rank, channel)
    finished = threading.Event()
    channel.publish_progress(rank, sink.counters())
    watcher = PeerWatcher(rank, channel, sink, finished).start()
    try:
        try:
            run_loop(spec, rank, world.env.local_rank, world.coordinator, sink, lambda: bool(signals.count))
            if sink.fatal is not None:
                # Our own error: never enter another collective; wait until rank 0 stored it.
                channel.wait_ack(rank, ABORT_GRACE_SECONDS)
                return Status.FAILED, worker_failed(sink.fatal, name)
            sink.flush(world.coordinator)
            status, error = broadcast(None, world.group)
            return Status(status), error
        except RemoteFailure as exc:
            return Status.FAILED, worker_failed(exc.event, name)
        except Exception as exc:  # a collective broke: another rank failed or died
            errors = wait_errors(channel, rank)
            return Status.FAILED, worker_failed(errors[min(errors)], name) if errors else lost(rank, exc, name)
    finally:
        try:
            channel.publish_progress(rank, sink.counters())
        except Exception:
            pass
        finished.set()
        # Not left running into interpreter teardown: a daemon thread inside a c10d store call then
        # cannot take the GIL back, and the rank aborts.
        watcher.thread.join(ABORT_GRACE_SECONDS)
