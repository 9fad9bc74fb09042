"""`Run.stop()` from another thread preempts a live run at its next checkpoint; resuming finishes it.

Observed only through nbbatch's public behaviour: outputs rows, `report_metrics` rows and the
run's status and reduced metrics in a real DuckDB store, with real worker processes.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time
from typing import Any

import pytest

import nbbatch
from nbbatch import MetricReducer, TorchBatchProcessor, torch_batch_process

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

N, BS, INTERVAL = 120, 2, 3


class Sum(MetricReducer):
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0

    def update(self, value: int) -> None:
        self.total += value

    def per_slot_reduce(self) -> int:
        return self.total

    def cross_slot_reduce(self, per_slot_metrics: list[int]) -> int:
        return sum(per_slot_metrics)


class Slow(TorchBatchProcessor):
    """Sleeps $NBBATCH_TEST_SLEEP per batch; reduces a sum and the global order; reports on_finish."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.sum = context.wrap_reducer(Sum(), name="sum")
        self.order = context.wrap_reducer(lambda values: values, name="order")
        self.sleep = float(os.environ.get("NBBATCH_TEST_SLEEP", "0"))

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        time.sleep(self.sleep)
        self.sum.update(int(batch.sum()))
        for value in batch.tolist():
            self.order.update(value)
        return {"value": batch * 10}

    def on_finish(self) -> None:
        self.context.report_metrics("lifecycle", 0, {"finish": 1})


def go(store: pathlib.Path, workers: int, name: str) -> nbbatch.Run:
    return torch_batch_process(Slow, list(range(N)), batch_size=BS, num_processes=workers,
                               checkpoint_interval=INTERVAL, store=str(store), run_name=name, progress=False)


def stop_when_committed(store: pathlib.Path, name: str, at_least: int, deadline: float) -> threading.Thread:
    """Call `Run.stop()` from another thread once `at_least` batches are committed."""
    seen: list[BaseException] = []

    def body() -> None:
        try:
            while time.monotonic() < deadline:
                try:
                    run = nbbatch.open_run(name, store=str(store))
                    if run.counts["committed_batches"] >= at_least:
                        run.stop()
                        return
                except (nbbatch.RunNotFound, nbbatch.StoreError):
                    pass  # the run row is not there yet
                time.sleep(0.05)
        except BaseException as exc:  # surfaced by the test below
            seen.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.seen = seen  # type: ignore[attr-defined]
    thread.start()
    return thread


def finishes(run: nbbatch.Run) -> dict[int, int]:
    rows = run.metrics().filter("name = 'finish'").aggregate("rank, count(*)").fetchall()
    return {int(r): int(c) for r, c in rows}


@pytest.mark.parametrize("workers,resume_workers", [(2, 2), (2, 1)], ids=["same-world", "fewer-workers"])
def test_stop_preempts_then_resume_matches_a_clean_run(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, workers: int, resume_workers: int
) -> None:
    store = tmp_path / "s.duckdb"
    monkeypatch.setenv("NBBATCH_TEST_SLEEP", "0.05")
    stopper = stop_when_committed(store, "p", at_least=2 * INTERVAL, deadline=time.monotonic() + 120)
    run = go(store, workers, "p")
    stopper.join(10)
    assert not stopper.seen, stopper.seen  # type: ignore[attr-defined]

    # Preempted at a checkpoint: committed work is a whole number of checkpoint steps, no on_finish.
    assert run.status == "preempted"
    committed = run.counts["committed_batches"]
    total = -(-N // BS)
    assert 0 < committed < total, "the stop must land mid-run"
    assert committed % (INTERVAL * workers) == 0, "commits happen per checkpoint step of every worker"
    assert finishes(run) == {}, "on_finish is not called on preemption"
    samples = [s for (s,) in run.outputs().project("sample_index").fetchall()]
    assert samples == list(range(len(samples))), "the committed prefix is whole global batches 0..k"
    # Reduced metrics over what was processed (the committed batches).
    assert run.reduced_metrics["sum"] == sum(samples)
    assert run.reduced_metrics["order"] == samples

    # Resume (possibly with another worker count): done, exactly once, metrics equal a clean run's.
    monkeypatch.setenv("NBBATCH_TEST_SLEEP", "0")
    resumed = go(store, resume_workers, "p")
    assert resumed.id == run.id and resumed.status == "done"
    assert [s for (s,) in resumed.outputs().project("sample_index").fetchall()] == list(range(N))
    assert [v for (v,) in resumed.outputs().project("value").fetchall()] == [10 * i for i in range(N)]
    assert sorted(g for (g,) in resumed.batches().project("global_batch").fetchall()) == list(range(total))
    assert finishes(resumed) == {r: 1 for r in range(resume_workers)}
    clean = go(store, resume_workers, "clean")
    assert clean.status == "done"
    assert resumed.reduced_metrics == clean.reduced_metrics == {"sum": sum(range(N)), "order": list(range(N))}

    # batch_idx continues on resume: it is the position in the worker's shard of that attempt's
    # world (g = batch_idx * W + rank), never restarted at 0.
    rows = resumed.sql("SELECT DISTINCT rank, batch_idx, global_batch FROM outputs ORDER BY global_batch").fetchall()
    assert len(rows) == total
    for rank, batch_idx, g in rows:
        world = workers if g < committed else resume_workers
        assert (rank, batch_idx) == (g % world, g // world), (rank, batch_idx, g)
    assert min(k for _, k, g in rows if g >= committed) == committed // resume_workers > 0
