"""The store writer and reader on a tmp DuckDB file: runs, atomic commits, output column types, lock,
and `interrupted` runs (a `running` row whose writer lock nobody holds)."""

from __future__ import annotations

import datetime
import os
import pathlib
import signal
import subprocess
import sys
import time
from typing import Any

import duckdb
import numpy as np
import pytest

import nbbatch
from nbbatch import ResumeMismatch, StoreBusy
from nbbatch._events import BatchDone, BatchFailed, MetricRecord, Status
from nbbatch._store.lock import End, WriterLock, ended, keep_end, writer_alive
from nbbatch._store.records import Commit, CommittedBatch, MetricRow, ProgressRow, ReducerStates, RunSpec
from nbbatch._store.writer import StoreWriter

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
    c.batches = [CommittedBatch(b, b.global_batch * 2) for b in batches]
    c.metrics = [MetricRow(b.rank, b.global_batch, b.batch_idx, m) for b in batches for m in b.metrics]
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
        assert record.output_dir == str(tmp_path / "out" / record.run_id)  # by id: names never become paths
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
        c.reducer_states = {0: ReducerStates(1, (b"r0",)), 1: ReducerStates(1, (b"r1",))}
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


# -- interrupted runs and the writer lock (nbbatch/_store/lock.py) ------------------------------

HOLDER = """
import sys
from nbbatch._store.records import RunSpec
from nbbatch._store.writer import StoreWriter
spec = RunSpec(name="live", processor="tests.P", dataset_len=8, batch_size=2, max_batches=None, checkpoint_interval=1,
               world_size=1, planned_batches=4, real_batches=4, on_error="raise", max_failures=None,
               output_root=sys.argv[2], launch=None, config={})
writer = StoreWriter(sys.argv[1])
writer.begin(spec)
print("ready", flush=True)
sys.stdin.read()  # holds the lock until killed
"""


def start_holder(tmp_path: pathlib.Path, store: pathlib.Path) -> subprocess.Popen[str]:
    """Another process that begins run 'live' and keeps holding the store's writer lock."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(store), str(tmp_path / "out")],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def raw_status(store: pathlib.Path, name: str) -> tuple[str, str | None]:
    con = duckdb.connect(str(store), read_only=True)
    try:
        row = con.execute("SELECT status, error FROM runs WHERE name = ?", [name]).fetchone()
    finally:
        con.close()
    assert row is not None
    return row[0], row[1]


def test_a_running_row_without_a_lock_holder_reads_as_interrupted(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    writer = StoreWriter(str(store))
    record = writer.begin(spec(tmp_path, name="gone"))
    progress = Commit(progress=[ProgressRow(0, 1, 2, 0, 3, 1, "running")])
    writer.commit(record, progress)
    assert nbbatch.open_run("gone", store=str(store)).status == "running"  # the writer of this process holds it
    writer.close()  # the launcher vanishes without `finish`: the row still says running

    assert raw_status(store, "gone") == ("running", None)
    run = nbbatch.open_run("gone", store=str(store))
    assert run.status is Status.INTERRUPTED and run.status == "interrupted"
    assert "ended without marking the run" in (run.error or "") and "run_name='gone'" in (run.error or "")
    assert run.summary["finished_at"] == run.summary["updated_at"]
    assert [r.status for r in nbbatch.list_runs(store=str(store))] == ["interrupted"]
    started = time.monotonic()
    assert run.wait() is run and time.monotonic() - started < 1.0

    from nbbatch._store import reader
    from nbbatch._ui.dashboard import queries

    with reader.reading(str(store)) as con:
        row = queries.runs(con, time.time())[0]
        assert row["status"] == "interrupted" and row["eta_s"] is None
        assert [w["status"] for w in queries.workers(con, record.run_id, record.attempt, row["status"])] == ["interrupted"]


def test_a_live_holder_in_another_process_keeps_its_run_running(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    holder = start_holder(tmp_path, store)
    try:
        assert writer_alive(str(store)) is True
        assert nbbatch.open_run("live", store=str(store)).status == "running"
        assert [r.status for r in nbbatch.list_runs(store=str(store))] == ["running"]
    finally:
        holder.kill()  # SIGKILL: no `finish`, no `close`
        holder.communicate(timeout=30)
    assert writer_alive(str(store)) is False
    assert nbbatch.open_run("live", store=str(store)).status == "interrupted"


def test_the_next_writer_records_interrupted_runs_and_resumes_them(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    first = StoreWriter(str(store))
    record = first.begin(spec(tmp_path, name="a"))
    first.commit(record, Commit(progress=[ProgressRow(0, 1, 2, 0, 3, 1, "running")]))
    first.close()

    second = StoreWriter(str(store))
    try:
        second.begin(spec(tmp_path, name="b"))
        status, error = raw_status(store, "a")
        assert status == "interrupted" and "ended without marking the run" in (error or "")
        assert nbbatch.open_run("a", store=str(store)).status == "interrupted"
        assert nbbatch.open_run("b", store=str(store)).status == "running"
    finally:
        second.close()

    third = StoreWriter(str(store))
    try:
        resumed = third.begin(spec(tmp_path, name="a"))
        assert resumed.status == "running" and resumed.attempt == 2
        run = nbbatch.open_run("a", store=str(store))
        assert run.status == "running" and run.error is None
        assert raw_status(store, "b")[0] == "interrupted"  # recorded by this writer's `begin`
    finally:
        third.close()
    con = duckdb.connect(str(store), read_only=True)
    try:
        assert con.execute("SELECT status FROM progress WHERE run_id = ?", [record.run_id]).fetchall() == [
            ("interrupted",)
        ]
    finally:
        con.close()


def test_an_end_the_store_refused_is_read_from_the_lock_file_then_stored(tmp_path: pathlib.Path) -> None:
    # A writer whose final status did not fit on a full disk keeps it in the lock file (`keep_end`).
    store = tmp_path / "s.duckdb"
    first = StoreWriter(str(store))
    record = first.begin(spec(tmp_path, name="a"))
    first.commit(record, Commit(progress=[ProgressRow(0, 1, 2, 0, 3, 1, "running")]))
    size = os.path.getsize(str(store) + ".lock")
    where = keep_end(first._lock, End(record.run_id, record.attempt, Status.DONE, "disk full: free space", 1.7e9))
    assert "(failed) is kept in" in where  # a done run whose reduced metrics were not stored ends failed
    assert os.path.getsize(str(store) + ".lock") == size == 4096, "written in place, into room taken at lock time"
    assert nbbatch.open_run("a", store=str(store)).status == "running"  # its writer still holds the lock
    first.close()

    run = nbbatch.open_run("a", store=str(store))
    assert run.status is Status.FAILED and run.error == "disk full: free space"
    assert run.summary["finished_at"] == datetime.datetime(2023, 11, 14, 22, 13, 20)  # 1.7e9, naive UTC
    assert run.wait(timeout=1) is run and [r.status for r in nbbatch.list_runs(store=str(store))] == ["failed"]
    assert raw_status(store, "a") == ("running", None)  # the store itself had no room

    second = StoreWriter(str(store))  # the next writer stores it and clears the slot
    try:
        second.begin(spec(tmp_path, name="b"))
        assert raw_status(store, "a") == ("failed", "disk full: free space")
        assert ended(str(store)) is None
    finally:
        second.close()

    third = StoreWriter(str(store))
    resumed = third.begin(spec(tmp_path, name="a"))
    assert resumed.attempt == 2
    keep_end(third._lock, End(record.run_id, 1, Status.FAILED, "an older attempt's end", 1.7e9))
    third.close()  # vanished without `finish`: an end of another attempt does not apply
    run = nbbatch.open_run("a", store=str(store))
    assert run.status == "interrupted" and "ended without marking the run" in (run.error or "")


def test_a_torn_or_foreign_end_record_is_ignored(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    lock = WriterLock(str(store))
    lock.record_end(End("abc", 1, Status.FAILED, "x" * 10000, 1.0))  # longer than the slot: shortened
    lock.release()
    end = ended(str(store))
    assert end is not None and end.status is Status.FAILED and 3000 < len(end.error or "") < 3840
    with open(str(store) + ".lock", "r+b") as handle:
        handle.seek(300)
        handle.write(b"garbage")
    assert ended(str(store)) is None


def test_querying_the_lock_never_makes_a_starting_writer_busy(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    WriterLock(str(store)).release()
    stop = tmp_path / "stop"
    code = ("import os, sys\nfrom nbbatch._store.lock import writer_alive\nn = 0\nprint('go', flush=True)\n"
            "while not os.path.exists(sys.argv[2]):\n    writer_alive(sys.argv[1]); n += 1\nprint(n)")
    reader = subprocess.Popen([sys.executable, "-c", code, str(store), str(stop)], stdout=subprocess.PIPE, text=True)
    try:
        assert reader.stdout is not None and reader.stdout.readline().strip() == "go"
        for _ in range(300):  # a reader that took the lock to test it would make some of these fail
            WriterLock(str(store)).release()
    finally:
        stop.touch()
        out, _ = reader.communicate(timeout=30)
    assert int(out.strip()) > 100, "the reader kept querying the lock meanwhile"


def test_a_forked_child_does_not_keep_a_dead_writers_lock(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    # The child says "forked" once its at-fork handlers ran: before that it still holds the copy.
    code = ("import os, sys, time\nfrom nbbatch._store.lock import WriterLock\nlock = WriterLock(sys.argv[1])\n"
            "pid = os.fork()\nif pid == 0:\n    os.write(1, b'forked\\n')\n    time.sleep(60)\n    os._exit(0)\n"
            "os.write(1, f'{pid}\\n'.encode())\ntime.sleep(60)")  # one write per line: the two never interleave
    parent = subprocess.Popen([sys.executable, "-c", code, str(store)], stdout=subprocess.PIPE, text=True)
    assert parent.stdout is not None
    with parent.stdout:  # the child holds the pipe open too: read the two lines only
        lines = {parent.stdout.readline().strip() for _ in range(2)}
    assert "forked" in lines, lines
    child = int((lines - {"forked"}).pop())
    try:
        assert writer_alive(str(store)) is True
        parent.kill()
        parent.wait(timeout=30)
        os.kill(child, 0)  # still alive, holding a copy of the lock's descriptor had it not closed it
        assert writer_alive(str(store)) is False
    finally:
        os.kill(child, signal.SIGKILL)
        parent.kill()
        parent.wait(timeout=30)


def test_the_lock_file_is_never_followed_through_a_symlink(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    before = victim.stat()
    os.symlink(victim, str(store) + ".lock")
    with pytest.raises(nbbatch.StoreError, match=r"is a symbolic link; nbbatch does not follow it .*`rm "):
        StoreWriter(str(store))
    assert victim.read_text() == "precious\n" and victim.stat().st_mtime_ns == before.st_mtime_ns
    assert writer_alive(str(store)) is False


def test_the_lock_file_is_never_truncated_nor_written_unless_it_is_ours(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    lock = pathlib.Path(str(store) + ".lock")
    lock.write_text("not a lock file\n" * 40)  # e.g. planted, or a file of the user's
    writer = StoreWriter(str(store))
    try:
        writer.begin(spec(tmp_path, name="live"))
        with pytest.raises(StoreBusy, match=r"in use by a live run \(another process\)"):
            StoreWriter(str(store))
    finally:
        writer.close()
    assert lock.read_text() == "not a lock file\n" * 40

    lock.unlink()
    (tmp_path / "other").touch()
    os.link(tmp_path / "other", lock)  # empty, but with a second name elsewhere: not ours to write
    StoreWriter(str(store)).close()
    assert lock.read_bytes() == b"" == (tmp_path / "other").read_bytes()

    lock.unlink()
    lock.write_text("run 'old', pid 12 on somehost")  # what earlier versions wrote: updated in place
    writer = StoreWriter(str(store))
    try:
        writer.begin(spec(tmp_path, name="new"))
        text = lock.read_text()
        assert text.startswith("nbbatch writer lock\nrun 'new', pid ") and len(text) == 4096  # holder + end slot
    finally:
        writer.close()


def test_a_lock_path_that_is_not_a_file_is_refused(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    os.mkfifo(str(store) + ".lock")  # opening a FIFO could block: it must not
    with pytest.raises(nbbatch.StoreError, match="is not a regular file"):
        StoreWriter(str(store))
    assert writer_alive(str(store)) is False
