"""The torchrun worker side against a real c10d store in this process: `Channel`, `PeerSink`, `PeerWatcher`,
`Counters`, `exit_later`.

Stores are torch.distributed's own: a `HashStore` and a `TCPStore` on port 0 (the kind torchrun
runs). A torchrun peer ships its events at checkpoints through a `Coordinator`; here that is the
real one-rank `SoloCoordinator`, with a record of what the peer handed it.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch.distributed as dist
from helpers import poll

from nbbatch._events import (
    BatchDone,
    BatchFailed,
    BatchStarted,
    CheckpointDone,
    SegmentWritten,
    Status,
    WorkerFinished,
    WorkerReady,
)
from nbbatch._worker.collective import SoloCoordinator
from nbbatch._worker.distributed import (
    EXIT_ABORTED,
    Channel,
    Counters,
    PeerSink,
    PeerWatcher,
    RemoteFailure,
    exit_later,
)
from nbbatch._worker.tally import STARTING, Tally

pytestmark = pytest.mark.timeout(20)

POLL = 0.01  # the watcher's poll in these tests: fast, so waits stay short


@pytest.fixture(params=["hash", "tcp"])
def store(request: pytest.FixtureRequest) -> Iterator[Any]:
    if request.param == "hash":
        yield dist.HashStore()
    else:
        yield dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)


def fatal(rank: int, message: str = "boom", g: int | None = None) -> BatchFailed:
    return BatchFailed(rank, g, None if g is None else 0, (), "RuntimeError", message, "tb", True, time.time())


class Recording(SoloCoordinator):
    """The one-rank coordinator, keeping what each rank handed to `gather`."""

    def __init__(self) -> None:
        self.gathered: list[Any] = []

    def gather(self, obj: Any) -> list[Any] | None:
        self.gathered.append(obj)
        return super().gather(obj)


# -- Counters and Tally ----------------------------------------------------------------------------


def test_tally_counts_a_workers_events() -> None:
    tally = Tally()
    assert tally.status == STARTING
    tally.count(WorkerReady(0, 1, "h", 0.0))
    assert tally.status == Status.RUNNING
    tally.count(BatchStarted(0, 4, 2, 5.0))
    assert tally.current == (4, 2, 5.0)
    tally.count(BatchDone(0, 4, 2, 8, 5.0, 0.1))
    tally.count(BatchStarted(0, 6, 3, 6.0))
    tally.count(BatchFailed(0, 6, 3, (12, 13), "E", "m", "", False, 6.5))
    tally.count(BatchFailed(0, None, None, (), "E", "outside a batch", "", True, 7.0))
    tally.count(CheckpointDone(0, 4))
    assert (tally.done, tally.rows, tally.failed, tally.current) == (1, 8, 1, None), "an error outside a batch is no batch"
    tally.count(WorkerFinished(0, "failed"))
    assert tally.status is Status.FAILED


def test_counters_round_trip_a_tally() -> None:
    tally = Tally(done=3, rows=24, failed=1, current=(7, 3, 1.5), status=Status.RUNNING)
    counters = Counters.of(9, tally, 100.0)
    assert (counters.seq, counters.t) == (9, 100.0)
    assert counters.tally() == tally


# -- Channel ---------------------------------------------------------------------------------------


def test_progress_of_ranks_that_published(store: Any) -> None:
    channel = Channel(store, "run1", 1, 3)
    assert channel.read_progress(range(1, 3)) == {}
    snapshot = Counters.of(1, Tally(done=2, rows=4), 10.0)
    channel.publish_progress(2, snapshot)
    assert channel.read_progress(range(1, 3)) == {2: snapshot}
    newer = Counters.of(2, Tally(done=3, rows=6), 11.0)
    channel.publish_progress(2, newer)
    assert channel.read_progress(range(1, 3)) == {2: newer}, "a rank's counters are overwritten"


def test_the_first_error_of_each_publisher_wins(store: Any) -> None:
    channel = Channel(store, "run1", 1, 3)
    assert channel.error_count() == 0 and channel.errors() == {}
    first, second, other = fatal(1, "first"), fatal(1, "second"), fatal(2, "other")
    channel.publish_error(1, first)
    channel.publish_error(1, second)
    channel.publish_error(2, other)
    assert channel.error_count() == 2
    assert channel.errors() == {1: first, 2: other}
    assert channel.errors(skip=1) == {2: other}


def test_attempts_and_runs_do_not_see_each_other(store: Any) -> None:
    this, next_attempt, other_run = Channel(store, "run1", 1, 2), Channel(store, "run1", 2, 2), Channel(store, "run2", 1, 2)
    this.publish_error(1, fatal(1))
    this.publish_progress(1, Counters.of(1, Tally(), 0.0))
    for channel in (next_attempt, other_run):
        assert channel.error_count() == 0 and channel.errors() == {} and channel.read_progress(range(2)) == {}


def test_wait_ack_returns_once_rank_0_acknowledged(store: Any) -> None:
    channel = Channel(store, "run1", 1, 2)
    started = time.monotonic()
    assert channel.wait_ack(1, 0.1) is False
    assert time.monotonic() - started < 2, "the wait is bounded by its timeout"
    threading.Timer(0.05, channel.ack, args=(1,)).start()
    assert channel.wait_ack(1, 5.0) is True


def test_a_channel_reads_another_clients_writes() -> None:
    """Rank 0 and a peer hold different clients of torchrun's TCPStore."""
    server = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, 1, False)
    peer, lead = Channel(client, "r", 1, 2), Channel(server, "r", 1, 2)
    peer.publish_progress(1, Counters.of(1, Tally(done=1), 0.0))
    peer.publish_error(1, fatal(1))
    assert lead.read_progress(range(1, 2))[1].done == 1 and lead.errors(skip=0)[1].message == "boom"
    lead.ack(1)
    assert peer.wait_ack(1, 5.0)


def segment(rank: int, step: int) -> SegmentWritten:
    return SegmentWritten(rank, step, f"seg-r{rank}-s{step}.parquet", 4, 100, "crc32:0", (step,), b"")


def test_segment_manifests_reach_rank_0_once_in_publishing_order() -> None:
    """Peers publish through their own clients of torchrun's TCPStore; rank 0 reads each manifest once."""
    server = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    lead = Channel(server, "r", 1, 3)
    one, two = (Channel(dist.TCPStore("127.0.0.1", server.port, 1, False), "r", 1, 3) for _ in range(2))
    assert lead.read_segments({}) == [] and lead.read_segments({1: 0, 2: 0}) == []
    one.publish_segment(1, 1, segment(1, 20))
    two.publish_segment(2, 1, segment(2, 20))
    one.publish_segment(1, 2, segment(1, 40))
    assert lead.read_segments({1: 2, 2: 1}) == [segment(1, 20), segment(1, 40), segment(2, 20)]
    assert lead.read_segments({1: 2, 2: 1}) == [] and lead.read_segments({1: 1}) == []
    two.publish_segment(2, 2, segment(2, 40))
    assert lead.read_segments({2: 2}) == [segment(2, 40)]
    assert not server.check(["nbbatch/r/1/segment/1/1"]), "rank 0 deletes what it read"


# -- PeerSink --------------------------------------------------------------------------------------


def test_peer_sink_buffers_until_flush_and_counts_live(store: Any) -> None:
    sink = PeerSink(1, Channel(store, "run1", 1, 2))
    events = [WorkerReady(1, 1, "h", 0.0), BatchStarted(1, 1, 0, 1.0), BatchDone(1, 1, 0, 4, 1.0, 0.1, {"y": [1] * 4})]
    for event in events:
        sink.emit(event)
    counters = sink.counters()
    assert (counters.seq, counters.done, counters.rows, counters.status) == (3, 1, 4, Status.RUNNING)
    coordinator = Recording()
    sink.flush(coordinator)
    shipped, shipped_counters = coordinator.gathered[0]
    assert shipped == events and shipped_counters.done == 1
    sink.flush(coordinator)
    assert coordinator.gathered[1][0] == [], "each event is shipped once"


def test_peer_sink_publishes_a_segment_manifest_at_once(store: Any) -> None:
    """The step's commit waits for the manifest, so it must not wait in the buffer for the next checkpoint."""
    sink = PeerSink(1, Channel(store, "run1", 1, 2))
    before = sink.counters()
    sink.emit(segment(1, 20))
    after = sink.counters()
    assert (before.segments, after.segments) == (0, 1) and after.seq > before.seq, "a newer snapshot says so"
    assert Channel(store, "run1", 1, 2).read_segments({1: after.segments}) == [segment(1, 20)]
    coordinator = Recording()
    sink.flush(coordinator)
    assert coordinator.gathered[0][0] == [], "not shipped a second time at the checkpoint"


def test_peer_sink_publishes_its_fatal_error_with_its_totals_first(store: Any) -> None:
    channel = Channel(store, "run1", 1, 2)
    sink = PeerSink(1, channel)
    sink.emit(BatchDone(1, 1, 0, 4, 1.0, 0.1))
    error = fatal(1, "own", g=3)
    sink.emit(error)
    sink.emit(fatal(1, "later"))
    assert sink.fatal == error and channel.errors() == {1: error}
    assert channel.read_progress(range(1, 2))[1].done == 1 and channel.read_progress(range(1, 2))[1].failed == 1


def test_peer_sink_unwinds_after_another_ranks_error(store: Any) -> None:
    sink = PeerSink(1, Channel(store, "run1", 1, 2))
    sink.abort = fatal(0, "rank 0 failed")
    with pytest.raises(RemoteFailure, match="rank 0 failed: RuntimeError: rank 0 failed") as info:
        sink.emit(BatchStarted(1, 1, 0, 0.0))
    assert info.value.event is sink.abort
    own = PeerSink(1, Channel(store, "run1", 1, 2))
    own.emit(fatal(1))
    own.abort = fatal(0)
    own.emit(WorkerFinished(1, "failed"))  # after its own error a rank only reports, it is not unwound


# -- PeerWatcher -----------------------------------------------------------------------------------


def test_watcher_publishes_counters_and_learns_of_errors(store: Any) -> None:
    channel = Channel(store, "run1", 1, 3)
    sink, finished = PeerSink(2, channel), threading.Event()
    watcher = PeerWatcher(2, channel, sink, finished, poll=POLL).start()
    try:
        sink.emit(BatchDone(2, 2, 0, 5, 0.0, 0.1))
        poll(lambda: channel.read_progress(range(3)).get(2, Counters.of(0, Tally(), 0)).done == 1, 5, "rank 2's counters")
        channel.publish_error(1, fatal(1, "rank 1 died"))
        abort = poll(lambda: sink.abort, 5, "the watcher to see rank 1's error")
        assert abort.rank == 1 and abort.message == "rank 1 died"
        with pytest.raises(RemoteFailure):
            sink.emit(BatchStarted(2, 5, 1, 0.0))
    finally:
        finished.set()  # also tells `exit_later`, started by the watcher, not to end this process
    watcher.thread.join(5)
    assert not watcher.thread.is_alive()


def test_watcher_ignores_its_own_error(store: Any) -> None:
    channel = Channel(store, "run1", 1, 2)
    sink, finished = PeerSink(1, channel), threading.Event()
    watcher = PeerWatcher(1, channel, sink, finished, poll=POLL).start()
    try:
        sink.emit(fatal(1))
        # Two heartbeats after the error: the round of the first one has looked at the errors.
        after = time.time()
        first = poll(lambda: heartbeat(channel, 1, after), 5, "a heartbeat after the error")
        poll(lambda: heartbeat(channel, 1, first), 5, "the next heartbeat")
        assert sink.abort is None
    finally:
        finished.set()
    watcher.thread.join(5)


def heartbeat(channel: Channel, rank: int, after: float) -> float | None:
    """The time of ``rank``'s last published counters, if later than ``after``."""
    t = channel.read_progress(range(rank + 1)).get(rank, Counters.of(0, Tally(), 0.0)).t
    return t if t > after else None


def test_watcher_stops_when_the_store_is_gone() -> None:
    server = dist.TCPStore("127.0.0.1", 0, 1, True, wait_for_workers=False)
    client = dist.TCPStore("127.0.0.1", server.port, 1, False, timeout=dt.timedelta(seconds=2))
    channel = Channel(client, "r", 1, 2)
    finished = threading.Event()
    watcher = PeerWatcher(1, channel, PeerSink(1, channel), finished, poll=POLL).start()
    try:
        poll(lambda: Channel(server, "r", 1, 2).read_progress(range(2)), 5, "a first publish")
        del server  # the host of the store (rank 0's machine) is gone
        watcher.thread.join(10)
        assert not watcher.thread.is_alive(), "the watcher leaves instead of failing the rank"
    finally:
        finished.set()


# -- exit_later ------------------------------------------------------------------------------------

EXIT_LATER = textwrap.dedent(
    """
    import sys, threading, time
    from nbbatch._worker.distributed import exit_later
    finished = threading.Event()
    exit_later(finished, 0.2)
    if sys.argv[1] == "finish":
        finished.set()
    time.sleep(float(sys.argv[2]))  # the grace passes meanwhile
    print("still here")
    """
)


def test_exit_later_ends_a_stuck_process() -> None:
    out = subprocess.run([sys.executable, "-c", EXIT_LATER, "stuck", "10"], capture_output=True, text=True, timeout=15)
    assert out.returncode == EXIT_ABORTED and "still here" not in out.stdout
    assert "another rank failed and this rank did not stop within 0s; exiting" in out.stderr


def test_exit_later_leaves_a_finished_process_alone() -> None:
    out = subprocess.run([sys.executable, "-c", EXIT_LATER, "finish", "0.6"], capture_output=True, text=True, timeout=15)
    assert out.returncode == 0 and "still here" in out.stdout, out.stderr
