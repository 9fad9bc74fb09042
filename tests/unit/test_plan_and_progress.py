"""Pure parts: sharding math, the rate/ETA model (fake clock), the supervisor's commit grouping."""

from __future__ import annotations

import math

import pytest

from nbbatch._events import BatchDone, BatchFailed, CheckpointDone, MetricRecord, WorkerFinished
from nbbatch._launch.supervisor import Supervisor
from nbbatch._plan import Fingerprint, make_sharding
from nbbatch._progress import PlainReporter, RateMeter, format_duration
from nbbatch._store.records import RunRecord

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("n,bs,w", [(50, 10, 2), (50, 20, 2), (7, 2, 3), (0, 4, 2), (1, 1, 5), (47, 2, 3)])
def test_every_global_batch_has_exactly_one_owner(n: int, bs: int, w: int) -> None:
    s = make_sharding(n, bs, w)
    owned = sorted(g for r in range(w) for g in s.todo(r))
    assert owned == list(range(math.ceil(n / bs)))
    assert s.iterate_length == math.ceil(n / bs / w)
    for r in range(w):
        for k, g in enumerate(s.todo(r)):
            assert g == s.global_batch(r, k)
    assert [i for g in owned for i in s.indices(g)] == list(range(n))


def test_max_batches_and_resume_with_another_world_size() -> None:
    fresh = make_sharding(50, 10, 2, iterate_length=2)
    assert fresh.planned_batches == 4 and fresh.real_batches == 4
    resumed = make_sharding(50, 10, 3, planned_batches=fresh.planned_batches)
    assert resumed.iterate_length == 2
    assert sorted(g for r in range(3) for g in resumed.todo(r)) == [0, 1, 2, 3]
    done = {0, 1, 2}
    assert [g for r in range(3) for g in resumed.todo(r, done)] == [3]
    assert resumed.start_batch_idx(done) == 1
    assert resumed.start_batch_idx({0, 1, 2, 3}) == resumed.iterate_length


def test_drop_last_keeps_the_iteration_count() -> None:
    s = make_sharding(7, 2, 3, drop_last=True)
    assert s.real_batches == 3 and s.iterate_length == 2


def test_fingerprint_names_the_first_difference() -> None:
    a = Fingerprint(10, 2, "m.P", None)
    assert a.first_difference(Fingerprint(10, 2, "m.P", None)) is None
    assert a.first_difference(Fingerprint(10, 3, "m.Q", None)) == ("batch_size", 2, 3)


def test_rate_meter_with_a_fake_clock() -> None:
    now = [0.0]
    meter = RateMeter(clock=lambda: now[0], window=10)
    assert meter.rate() is None and meter.eta(100) is None
    meter.add(0)
    now[0] = 4.0
    meter.add(200)
    assert meter.rate() == 50.0 and meter.eta(100) == 2.0 and meter.eta(0) == 0.0
    now[0] = 30.0  # old samples leave the window
    meter.add(1200)
    assert meter.rate() == pytest.approx(1000 / 26)


def test_format_duration_and_plain_reporter() -> None:
    assert [format_duration(s) for s in (None, 5, 65, 3725)] == ["?", "5s", "1m05s", "1h02m"]
    lines: list[str] = []

    class Stream:
        def write(self, text: str) -> None:
            lines.append(text)

        def flush(self) -> None:
            pass

    now = [0.0]
    reporter = PlainReporter(every=10, clock=lambda: now[0], stream=Stream())  # type: ignore[arg-type]
    record = RunRecord("abc", "r", "running", 1, 4, "/tmp", frozenset(), ())
    sup = Supervisor(record, make_sharding(8, 2, 1), clock=lambda: now[0])
    reporter.update(sup.snapshot("running"))
    now[0] = 5
    reporter.update(sup.snapshot("running"))
    now[0] = 11
    reporter.update(sup.snapshot("running"))
    assert len(lines) == 2 and "0/4 batches" in lines[0]


def _done(rank: int, g: int, k: int) -> BatchDone:
    return BatchDone(rank, g, k, 2, 0.0, 0.1, None, (MetricRecord("m", k, (("loss", 1.0),), 0.0),))


def test_a_step_is_committed_only_when_every_worker_reported_it() -> None:
    record = RunRecord("abc", "r", "running", 1, 4, "/tmp", frozenset(), ())
    sup = Supervisor(record, make_sharding(8, 2, 2), clock=lambda: 0.0)
    sup.handle(_done(0, 0, 0))
    sup.handle(_done(1, 1, 0))
    sup.handle(CheckpointDone(0, 1, (b"s0",)))
    commit = sup.take_commit()
    assert commit.batches == [] and commit.progress, "rank 1 has not reached the checkpoint yet"
    sup.handle(CheckpointDone(1, 1, (b"s1",)))
    commit = sup.take_commit()
    assert sorted(b.global_batch for b, _ in commit.batches) == [0, 1]
    assert [first for _, first in sorted(commit.batches, key=lambda x: x[0].global_batch)] == [0, 2]
    assert commit.reducer_states == {0: (1, (b"s0",)), 1: (1, (b"s1",))}
    assert len(commit.metrics) == 2
    # A batch delivered twice is never committed twice.
    sup.handle(_done(0, 0, 0))
    sup.handle(CheckpointDone(0, 2, ()))
    sup.handle(CheckpointDone(1, 2, ()))
    assert sup.take_commit().batches == []


def test_fatal_failure_and_finish_are_recorded() -> None:
    record = RunRecord("abc", "r", "running", 1, 4, "/tmp", frozenset({0}), ())
    sup = Supervisor(record, make_sharding(8, 2, 1), clock=lambda: 0.0)
    assert sup.done_batches == 1
    sup.handle(BatchFailed(0, 1, 1, (2, 3), "ValueError", "bad", "tb", True, 0.0))
    sup.handle(WorkerFinished(0, "failed"))
    assert sup.fatal is not None and sup.fatal.indices == (2, 3)
    assert sup.take_commit().errors[0].exc_type == "ValueError"
    assert sup.snapshot("failed").failed_batches == 1
