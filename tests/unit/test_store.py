"""The store writer and reader on a tmp DuckDB file: runs, atomic commits, output column types, lock."""

from __future__ import annotations

import pathlib
from typing import Any

import duckdb
import numpy as np
import pytest

import nbbatch
from nbbatch import ResumeMismatch, StoreBusy
from nbbatch._events import BatchDone, BatchFailed, MetricRecord
from nbbatch._store.writer import Commit, ProgressRow, RunSpec, StoreWriter

pytestmark = pytest.mark.timeout(60)


def spec(tmp_path: pathlib.Path, name: str | None = "r", **changes: Any) -> RunSpec:
    fields: dict[str, Any] = dict(
        name=name, processor="tests.P", dataset_len=8, batch_size=2, max_batches=None, checkpoint_interval=1,
        world_size=2, planned_batches=4, real_batches=4, on_error="raise", max_failures=None,
        output_root=str(tmp_path / "out"), launch=None, config={"batch_size": 2},
    )
    fields.update(changes)
    return RunSpec(**fields)


def done(g: int, outputs: dict[str, Any] | None, metrics: tuple[MetricRecord, ...] = ()) -> BatchDone:
    return BatchDone(g % 2, g, g // 2, 2, 1000.0 + g, 0.25, outputs, metrics)


def commit_of(*batches: BatchDone) -> Commit:
    c = Commit()
    c.batches = [(b, b.global_batch * 2) for b in batches]
    c.metrics = [(b.rank, b.global_batch, b.batch_idx, m) for b in batches for m in b.metrics]
    return c


def columns(g: int) -> dict[str, Any]:
    """Per-sample outputs of one 2-sample batch, as a worker sends them."""
    return {
        "score": np.array([g + 0.5, g + 0.25], dtype=np.float32),
        "label": np.array([g, g + 1], dtype=np.int64),
        "embedding": np.arange(6, dtype=np.float32).reshape(2, 3) + g,
        "ragged": [list(range(g)), [g]],
        "text": [f"a{g}", f"b{g}"],
    }


def test_new_run_commits_and_reads_back_with_types(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    writer = StoreWriter(str(store))
    try:
        record = writer.begin(spec(tmp_path))
        assert record.status == "running" and record.done == frozenset() and record.attempt == 1
        assert record.output_dir == str(tmp_path / "out" / "r")
        metric = MetricRecord("eval", 3, (("loss", 0.5), ("tags", ["x", "y"])), 1000.0)
        writer.commit(record, commit_of(done(0, columns(0), (metric,)), done(1, columns(1))))
        writer.commit(record, commit_of(done(2, columns(2)), done(3, None)))
        writer.finish(record, "done", {"acc": np.float32(0.75), "counts": np.array([1, 2])}, None)
    finally:
        writer.close()

    run = nbbatch.open_run("r", store=str(store))
    assert run.status == "done" and run.reduced_metrics == {"acc": 0.75, "counts": [1, 2]}
    assert run.counts["committed_batches"] == 4 and run.counts["rows"] == 8
    types = dict(run.sql("SELECT column_name, column_type FROM (DESCRIBE outputs)").fetchall())
    assert types == {
        "run_id": "VARCHAR", "rank": "INTEGER", "batch_idx": "BIGINT", "global_batch": "BIGINT",
        "sample_index": "BIGINT", "score": "FLOAT", "label": "BIGINT", "embedding": "FLOAT[3]",
        "ragged": "BIGINT[]", "text": "VARCHAR",
    }
    rows = run.outputs().project("sample_index, rank, batch_idx, global_batch, score, embedding, ragged, text").fetchall()
    # Batch 3 returned None: it is committed (a "done" mark) but stores no rows.
    assert [r[0] for r in rows] == [0, 1, 2, 3, 4, 5]
    assert rows[2] == (2, 1, 0, 1, 1.5, (1.0, 2.0, 3.0), [0], "a1")
    assert rows[5][5:] == ((5.0, 6.0, 7.0), [2], "b2")
    assert run.sql("SELECT list_sum(embedding) FROM outputs WHERE sample_index = 0").fetchall() == [(3.0,)]
    metrics = run.metrics().project('"group", steps_completed, name, value, value_json, global_batch').fetchall()
    assert sorted(metrics) == [("eval", 3, "loss", 0.5, None, 0), ("eval", 3, "tags", None, '["x", "y"]', 0)]
    assert sorted(g for (g,) in run.batches().project("global_batch").fetchall()) == [0, 1, 2, 3]


def test_a_failing_commit_writes_nothing(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    writer = StoreWriter(str(store))
    try:
        record = writer.begin(spec(tmp_path))
        writer.commit(record, commit_of(done(0, {"y": np.array([1.0, 2.0])})))
        bad = commit_of(done(1, {"y": ["not", "numbers"]}, (MetricRecord("m", 0, (("x", 1),), 0.0),)))
        bad.errors = [BatchFailed(1, 1, 0, (2, 3), "ValueError", "boom", "tb", False, 0.0)]
        bad.progress = [ProgressRow(1, 1, 2, 0, 1, None, "running")]
        with pytest.raises(nbbatch.StoreError, match="type"):
            writer.commit(record, bad)
        writer.finish(record, "failed", None, "stopped")
    finally:
        writer.close()
    con = duckdb.connect(str(store), read_only=True)
    try:
        assert con.execute("SELECT global_batch FROM batches").fetchall() == [(0,)]
        assert con.execute("SELECT count(*) FROM metrics").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM errors").fetchone() == (0,)
        assert con.execute("SELECT count(*) FROM progress").fetchone() == (0,)
        table = con.execute("SELECT table_name FROM information_schema.tables WHERE table_name LIKE 'outputs_%'").fetchall()
        assert con.execute(f"SELECT y FROM {table[0][0]} ORDER BY sample_index").fetchall() == [(1.0,), (2.0,)]
    finally:
        con.close()


def test_resume_returns_committed_batches_and_reducer_states(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    writer = StoreWriter(str(store))
    try:
        first = writer.begin(spec(tmp_path))
        c = commit_of(done(0, None), done(1, None))
        c.reducer_states = {0: (1, (b"r0",)), 1: (1, (b"r1",))}
        writer.commit(first, c)
        writer.finish(first, "preempted", {"sum": 1}, None)
        again = writer.begin(spec(tmp_path, world_size=3))
        assert again.run_id == first.run_id and again.attempt == 2 and again.status == "running"
        assert again.done == frozenset({0, 1})
        assert again.reducer_states == ((1, 0, (b"r0",)), (1, 1, (b"r1",)))
        with pytest.raises(ResumeMismatch) as info:
            writer.begin(spec(tmp_path, dataset_len=9))
        assert info.value.field == "dataset_len" and "dataset_len=8" in str(info.value) and "dataset_len=9" in str(info.value)
        writer.commit(again, commit_of(done(2, None), done(3, None)))
        writer.finish(again, "done", {"sum": 6}, None)
        finished = writer.begin(spec(tmp_path))
        assert finished.status == "done" and finished.attempt == 2, "a finished run is returned as is"
    finally:
        writer.close()
    run = nbbatch.open_run(first.run_id, store=str(store))
    assert run.name == "r" and run.status == "done" and run.reduced_metrics == {"sum": 6}


def test_a_batch_committed_twice_is_refused_by_the_store(tmp_path: pathlib.Path) -> None:
    """The primary key on (run_id, global_batch) is the last line of defence for exactly-once."""
    store = tmp_path / "s.duckdb"
    writer = StoreWriter(str(store))
    try:
        record = writer.begin(spec(tmp_path))
        writer.commit(record, commit_of(done(0, {"y": np.array([1, 2])})))
        with pytest.raises(nbbatch.StoreError):
            writer.commit(record, commit_of(done(1, {"y": np.array([3, 4])}), done(0, {"y": np.array([1, 2])})))
    finally:
        writer.close()
    run = nbbatch.open_run("r", store=str(store))
    assert [s for (s,) in run.outputs().project("sample_index").fetchall()] == [0, 1]


def test_second_writer_is_busy_and_the_lock_is_released(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    writer = StoreWriter(str(store))
    try:
        writer.begin(spec(tmp_path, name="live"))
        with pytest.raises(StoreBusy, match=r"in use by a live run \(run 'live', pid \d+"):
            StoreWriter(str(store))
    finally:
        writer.close()
    StoreWriter(str(store)).close()


def test_reader_errors(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    with pytest.raises(nbbatch.StoreError, match="no store at"):
        nbbatch.open_run("x", store=str(store))
    StoreWriter(str(store)).close()
    with pytest.raises(nbbatch.RunNotFound, match="the store has no runs yet"):
        nbbatch.open_run("x", store=str(store))
    assert nbbatch.list_runs(store=str(store)) == []
