"""The shared run lifecycle, fed by both transports: local pipes and torchrun's c10d channel.

A real DuckDB store and real pipes / a real c10d store; the events are the ones workers send.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import pathlib
import time
from typing import Any

import duckdb
import numpy as np
import pytest
import torch.distributed as dist

from nbbatch._errors import NbbatchError, RunFailed, WorkerFailed
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
from nbbatch._launch.lead import Lead
from nbbatch._launch.lifecycle import Lifecycle, Signals, begin, conclude
from nbbatch._launch.local import _Workers
from nbbatch._plan import make_sharding
from nbbatch._progress import NullReporter
from nbbatch._store.control import stop_file
from nbbatch._store.records import RunSpec
from nbbatch._worker.distributed import Channel, Counters, PeerSink
from nbbatch._worker.segments import Segments, settings

pytestmark = pytest.mark.timeout(60)

WORLD = 2
N, BS = 8, 2  # 4 global batches: rank 0 owns 0 and 2, rank 1 owns 1 and 3


def _spec(tmp_path: pathlib.Path, name: str = "life") -> RunSpec:
    return RunSpec(
        name=name, processor="tests.P", dataset_len=N, batch_size=BS, max_batches=None, checkpoint_interval=2,
        world_size=WORLD, planned_batches=4, real_batches=4, on_error="raise", max_failures=None,
        output_root=str(tmp_path / "out"), launch=None, config={},
    )


@pytest.fixture
def life(tmp_path: pathlib.Path) -> Any:
    store = str(tmp_path / "s.duckdb")
    writer, record = begin(store, _spec(tmp_path))
    lifecycle = Lifecycle(record, make_sharding(N, BS, WORLD), writer, NullReporter(), batch_timeout=None)
    yield lifecycle
    writer.close()


def _worker_events(rank: int, status: Status = Status.DONE) -> list[Any]:
    """What a worker sends for its two batches and one checkpoint, then its end."""
    now = time.time()
    events: list[Any] = [WorkerReady(rank, os.getpid(), "localhost", now)]
    for k in range(2):
        g = k * WORLD + rank
        events += [BatchStarted(rank, g, k, now), BatchDone(rank, g, k, BS, now, 0.01, {"y": [g] * BS})]
    events += [CheckpointDone(rank, 1), WorkerFinished(rank, status)]
    return events


def _stored(life: Lifecycle) -> tuple[str, list[int]]:
    life.writer.close()
    with duckdb.connect(life.writer.path, read_only=True) as con:
        status = con.execute("SELECT status FROM runs").fetchone()
        done = con.execute("SELECT global_batch FROM batches ORDER BY 1").fetchall()
    assert status is not None
    return status[0], [g for (g,) in done]


# -- the lifecycle itself ------------------------------------------------------------------------
def test_every_worker_done_commits_every_batch_once_and_ends_done(life: Lifecycle) -> None:
    for rank in range(WORLD):
        for event in _worker_events(rank):
            life.handle(event)
    life.handle(Reduced({"total": 6}))
    life.flush()
    assert life.decide(WORLD) == (Status.DONE, None)
    assert life.finish(Status.DONE, None) == (Status.DONE, None)
    assert life.finish(Status.FAILED, None) == (Status.DONE, None), "the first end is the end"
    life.close()
    assert _stored(life) == ("done", [0, 1, 2, 3])
    with duckdb.connect(life.writer.path, read_only=True) as con:
        assert con.execute("SELECT reduced_metrics FROM runs").fetchone() == ('{"total": 6}',)


def test_a_fatal_event_fails_the_run_with_the_workers_traceback(life: Lifecycle) -> None:
    life.handle(BatchFailed(1, 3, 1, (6, 7), "ValueError", "bad row", "Traceback: here", True, time.time()))
    error = life.check()
    assert isinstance(error, WorkerFailed)
    assert (error.rank, error.batch_idx, error.global_batch, tuple(error.indices)) == (1, 1, 3, (6, 7))
    assert "dataset indices 6..7" in str(error) and "run_name='life'" in str(error)
    assert life.decide(WORLD) == (Status.FAILED, error)
    life.finish(*life.decide(WORLD))
    assert _stored(life)[0] == "failed"


def test_a_stop_request_is_seen_once_and_a_preempted_end_is_preempted(life: Lifecycle) -> None:
    signals = Signals()
    assert not life.wants_stop(signals)
    pathlib.Path(stop_file(life.writer.path, life.record.run_id)).touch()
    assert life.wants_stop(signals) and not life.wants_stop(signals), "one stop request, one answer"
    for rank in range(WORLD):
        life.handle(WorkerFinished(rank, Status.PREEMPTED))
    assert life.decide(WORLD) == (Status.PREEMPTED, None)
    life.finish(Status.PREEMPTED, None)
    life.close()
    assert not os.path.exists(stop_file(life.writer.path, life.record.run_id)), "the request is used up"


def test_too_many_skipped_batches_fail_the_run_with_run_failed(life: Lifecycle) -> None:
    life.handle(CheckpointDone(0, 1, failed=True))
    status, error = life.decide(WORLD)
    assert status == Status.FAILED and isinstance(error, RunFailed) and "max_failures" in str(error)


def test_a_missing_worker_end_is_an_unexpected_state(life: Lifecycle) -> None:
    life.handle(WorkerFinished(0, Status.DONE))
    status, error = life.decide(WORLD)
    assert status == Status.FAILED and isinstance(error, NbbatchError) and "unexpected state" in str(error)


def test_a_batch_over_the_timeout_fails_the_run_naming_it(life: Lifecycle) -> None:
    life.batch_timeout = 5.0
    life.handle(BatchStarted(1, 1, 0, time.time() - 60))
    error = life.check()
    assert isinstance(error, WorkerFailed) and error.global_batch == 1 and "batch_timeout=5.0" in str(error)


def test_conclude_raises_the_error_or_the_signal_the_caller_must_see() -> None:
    signals = Signals()
    conclude(Status.DONE, None, signals, "r")  # nothing to raise
    with pytest.raises(RunFailed):
        conclude(Status.FAILED, RunFailed("x"), signals, "r")
    signals.note(2)
    with pytest.raises(KeyboardInterrupt, match="preempted and committed"):
        conclude(Status.PREEMPTED, None, signals, "r")
    signals.note(15)
    with pytest.raises(SystemExit) as exit_:
        conclude(Status.PREEMPTED, None, signals, "r")
    assert exit_.value.code == 143


# -- the local transport: events through real pipes ------------------------------------------------
def test_local_pipes_move_events_into_the_lifecycle_until_they_close(life: Lifecycle) -> None:
    workers = _Workers(life.sup)
    senders = []
    for rank in range(WORLD):
        recv, send = multiprocessing.Pipe(duplex=False)
        workers.open[recv] = rank
        senders.append(send)
        for event in _worker_events(rank):
            send.send(event)
    for send in senders:
        send.close()
    while workers.open:
        workers.pump()
    assert workers.died_silently() is None
    life.flush()
    assert life.decide(WORLD) == (Status.DONE, None)
    life.finish(Status.DONE, None)
    assert _stored(life) == ("done", [0, 1, 2, 3])


# -- the torchrun transport: rank 0's lead, other ranks through the c10d store ---------------------
@pytest.fixture
def lead(life: Lifecycle) -> Any:
    channel = Channel(dist.HashStore(), life.record.run_id, life.record.attempt, WORLD)
    lead = Lead(life, channel)
    yield lead
    lead.finished.set()  # a failed lead leaves the process after a grace period unless finished


def test_a_peer_s_published_counters_reach_the_lifecycle(lead: Lead) -> None:
    lead.channel.publish_progress(1, Counters(seq=1, done=1, rows=2, failed=0, current=None,
                                              status=Status.RUNNING, t=time.time()))
    lead._poll(1, Signals())
    worker = lead.life.sup.workers[1]
    assert (worker.done, worker.rows) == (1, 2)


def test_a_peer_s_published_error_fails_the_run_in_the_store_and_is_acknowledged(lead: Lead) -> None:
    event = BatchFailed(1, 1, 0, (2, 3), "RuntimeError", "boom", "Traceback: peer", True, time.time())
    lead.channel.publish_error(1, event)
    lead._poll(1, Signals())
    status, error = lead.life.result or (None, None)
    assert status == Status.FAILED and isinstance(error, WorkerFailed) and error.rank == 1
    assert lead.channel.wait_ack(1, 1.0), "the peer waits for this ack before it leaves"
    assert _stored(lead.life)[0] == "failed"


def test_a_step_commits_once_the_peer_s_segment_manifest_arrives_through_the_c10d_store(lead: Lead) -> None:
    """A peer does not wait for its segment at the checkpoint; the step commits when the manifest comes."""
    record = lead.life.record
    config = settings(record.output_dir, record.attempt)
    assert config is not None, "the run's folder holds the attempt's segment marker"
    for rank in range(WORLD):
        events = [e if not isinstance(e, BatchDone) else dataclasses.replace(e, outputs=None)
                  for e in _worker_events(rank)[:-1]]
        events[-1] = dataclasses.replace(events[-1], segment=True)
        for event in events:  # rank 0's own events, and rank 1's as the checkpoint's gather brings them
            lead.life.handle(event)
    own = Segments(config, record.run_id, record.attempt, 0)
    own.add(0, 0, 0, {"y": np.zeros((2, 3), np.float32)})
    own.seal(1)
    for event in own.drain():
        lead.life.handle(event)
    lead._poll(1, Signals())
    assert lead.life.sup.committed == set(), "rank 1's segment has not arrived: the step waits"
    peer = Segments(config, record.run_id, record.attempt, 1)
    peer.add(1, 0, 2, {"y": np.ones((2, 3), np.float32)})
    peer.seal(1)
    sink = PeerSink(1, lead.channel)
    sink.emit(peer.drain()[0])
    lead.channel.publish_progress(1, sink.counters())
    lead._poll(2, Signals())
    assert lead.life.sup.committed == {0, 1, 2, 3}, "committed at the flusher's poll, not at a later checkpoint"
    for rank in range(WORLD):
        lead.life.handle(WorkerFinished(rank, Status.DONE))
    lead.life.finish(*lead.life.decide(WORLD))
    assert _stored(lead.life) == ("done", [0, 1, 2, 3])


def test_a_stop_file_reaches_every_rank_through_the_lead(lead: Lead) -> None:
    pathlib.Path(stop_file(lead.life.writer.path, lead.life.record.run_id)).touch()
    lead._poll(1, Signals())
    assert lead.stop.is_set() and lead.life.stop_requested
