"""The supervisor's commit grouping, fed by hand: steps commit in order, whole, once; live state."""

from __future__ import annotations

import pytest

from nbbatch._events import BatchDone, BatchFailed, BatchStarted, CheckpointDone, MetricRecord, WorkerFinished
from nbbatch._launch.supervisor import Supervisor
from nbbatch._plan import make_sharding
from nbbatch._progress import RateMeter
from nbbatch._store.records import RunRecord

pytestmark = pytest.mark.timeout(30)


def record(done: frozenset[int] = frozenset()) -> RunRecord:
    return RunRecord("abc", "r", "running", 1, 6, "/tmp", done, ())


def done(rank: int, g: int, world: int = 2, rows: int = 2) -> BatchDone:
    return BatchDone(rank, g, g // world, rows, 0.0, 0.1, {"y": [g] * rows})


def committed(sup: Supervisor) -> list[int]:
    return sorted(b.global_batch for b, _ in sup.take_commit().batches)


def test_a_later_step_waits_for_an_earlier_incomplete_one() -> None:
    now = [0.0]
    sup = Supervisor(record(), make_sharding(12, 2, 2), clock=lambda: now[0])
    # Rank 0 races ahead two steps; rank 1 has only finished its first batch.
    for g in (0, 2):
        sup.handle(done(0, g))
        sup.handle(CheckpointDone(0, g // 2 + 1))
    sup.handle(done(1, 1))
    assert committed(sup) == [], "step 1 lacks rank 1's checkpoint; step 2 must wait behind it"
    sup.handle(CheckpointDone(1, 1))
    assert committed(sup) == [0, 1], "step 1 now whole; step 2 still lacks rank 1"
    sup.handle(done(1, 3))
    sup.handle(CheckpointDone(1, 2))
    assert committed(sup) == [2, 3]
    assert committed(sup) == [], "nothing is committed twice"


def test_first_index_and_metrics_travel_with_their_batch() -> None:
    sup = Supervisor(record(), make_sharding(5, 2, 1), clock=lambda: 0.0)
    metric = MetricRecord("g", 0, (("loss", 1.0),), 0.0)
    sup.handle(BatchDone(0, 2, 2, 1, 0.0, 0.1, None, (metric,)))
    sup.handle(CheckpointDone(0, 3, (b"state",), (MetricRecord("ckpt", 0, (("n", 1),), 0.0),)))
    commit = sup.take_commit()
    assert [(b.global_batch, first) for b, first in commit.batches] == [(2, 4)], "global batch 2 starts at index 4"
    assert [(m[0], m[1], m[2], m[3].group) for m in commit.metrics] == [(0, 2, 2, "g"), (0, None, None, "ckpt")]
    assert commit.reducer_states == {0: (3, (b"state",))}


def test_resumed_record_skips_done_batches_and_refuses_them_again() -> None:
    sup = Supervisor(record(frozenset({0, 1, 2})), make_sharding(12, 2, 3, planned_batches=6), clock=lambda: 0.0)
    assert [w.todo for w in sup.workers] == [1, 1, 1] and sup.done_batches == 3
    for rank in range(3):
        sup.handle(done(rank, rank, world=3))  # a misbehaving worker resends a committed batch
        sup.handle(done(rank, rank + 3, world=3))
        sup.handle(CheckpointDone(rank, 2))
    assert committed(sup) == [3, 4, 5]


def test_stop_and_failure_flags_and_fatal_error() -> None:
    sup = Supervisor(record(), make_sharding(8, 2, 2), clock=lambda: 0.0)
    sup.handle(CheckpointDone(0, 1, stop=True))
    sup.handle(CheckpointDone(1, 1, failed=True))
    assert sup.stop_agreed and sup.too_many_failures
    skip = BatchFailed(0, 2, 1, (4, 5), "KeyError", "k", "tb", False, 0.0)
    fatal = BatchFailed(1, 3, 1, (6, 7), "ValueError", "v", "tb", True, 0.0)
    sup.handle(skip)
    sup.handle(fatal)
    assert sup.fatal is fatal
    assert list(sup.recent_errors) == ["rank 0, batch_idx 1: KeyError: k", "rank 1, batch_idx 1: ValueError: v"]
    assert [e.exc_type for e in sup.take_commit().errors] == ["KeyError", "ValueError"]
    assert sup.take_commit().errors == [], "errors are written once"
    sup.handle(WorkerFinished(0, "failed", used_upload_path=True))
    assert sup.finished == {0: "failed"} and sup.used_upload_path


def test_hang_detection_and_snapshot_with_a_fake_clock() -> None:
    now = [100.0]
    sup = Supervisor(record(), make_sharding(8, 2, 2), clock=lambda: now[0])
    sup.handle(BatchStarted(1, 1, 0, 100.0))
    now[0] = 105.0
    assert sup.hung(timeout=10) is None
    now[0] = 112.0
    assert sup.hung(timeout=10) == (1, 1, 0, 12.0)
    sup.handle(done(1, 1))
    assert sup.hung(timeout=10) is None
    snap = sup.snapshot("running")
    assert (snap.total_batches, snap.done_batches, snap.committed_batches, snap.rows) == (4, 1, 0, 2)
    assert snap.workers[1].done == 1 and snap.workers[1].total == 2 and snap.fraction == 0.25
    now[0] = 116.0
    sup.handle(done(0, 0))
    sup.handle(done(0, 2))
    snap = sup.snapshot("running")
    assert snap.rate == pytest.approx(4 / 4.0) and snap.eta == pytest.approx(2 / 1.0)
    final = sup.snapshot("done")
    assert final.rate == pytest.approx(6 / 16.0), "the final line shows the attempt's average"


def test_rate_meter_edges() -> None:
    now = [0.0]
    meter = RateMeter(clock=lambda: now[0], window=5)
    meter.add(10)
    meter.add(20)
    assert meter.rate() is None, "no time has passed"
    now[0] = 1.0
    meter.add(20)
    assert meter.rate() == 10.0 and meter.eta(-5) == 0.0
    now[0] = 2.0
    meter.add(20)
    now[0] = 100.0
    meter.add(20)
    assert meter.rate() == 0.0 and meter.eta(10) is None, "a stalled run has no ETA"
    assert len(meter.samples) == 2, "old samples leave the window"
