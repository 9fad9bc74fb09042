"""Segments without processes: the worker's writer, the manifest and view, orphans, and the Supervisor's rule
that a step commits only together with the segments holding its outputs."""

from __future__ import annotations

import errno
import json
import os
import pathlib
import subprocess
import sys
import zlib

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

from nbbatch._events import BatchDone, CheckpointDone, SegmentWritten
from nbbatch._launch.supervisor import Supervisor
from nbbatch._plan import make_sharding
from nbbatch._rows import is_segment_name, marker_name, segment_name
from nbbatch._store import segments as store_segments
from nbbatch._store.connection import ensure_schema
from nbbatch._store.records import RunRecord
from nbbatch._worker.segments import SegmentFailed, Segments, Settings, batch_bytes, settings

pytestmark = pytest.mark.timeout(60)

RUN = "ab12"


def write_one(folder: pathlib.Path, step: int = 1, rank: int = 0, width: int = 8) -> SegmentWritten:
    seg = Segments(Settings(str(folder), 0), RUN, attempt=1, rank=rank)
    for k, g in enumerate((rank, rank + 2)):
        seg.add(g, k, 4 * g, {"vector": np.full((4, width), g, dtype=np.float32), "label": [f"s{g}"] * 4})
    assert seg.seal(step)
    (event,) = seg.drain()
    return event


def test_a_segment_is_one_checked_parquet_file_named_by_run_attempt_rank_and_step(tmp_path: pathlib.Path) -> None:
    event = write_one(tmp_path)
    path = tmp_path / event.file
    assert event.file == segment_name(RUN, 1, 0, 1) == "seg-ab12-a1-r0-s1.parquet" and is_segment_name(event.file)
    data = path.read_bytes()
    assert event.nbytes == len(data) and event.checksum == f"crc32:{zlib.crc32(data):08x}"
    assert event.rows == 8 and event.global_batches == (0, 2)
    assert not list(tmp_path.glob("*.partial"))
    rows = duckdb.sql(f"SELECT run_id, sample_index, global_batch FROM '{path}' ORDER BY sample_index").fetchall()
    assert rows == [(RUN, i, 0) for i in range(4)] + [(RUN, i, 2) for i in range(8, 12)]


def test_a_segment_keeps_statistics_for_flat_columns_only(tmp_path: pathlib.Path) -> None:
    """DuckDB skips row groups by the key columns' min/max; float vectors' statistics would only cost."""
    event = write_one(tmp_path)
    group = pq.ParquetFile(tmp_path / event.file).metadata.row_group(0)
    stats = {group.column(i).path_in_schema: group.column(i).is_stats_set for i in range(group.num_columns)}
    assert stats.pop("vector.list.element") is False
    assert all(stats.values()) and {"sample_index", "global_batch", "label"} <= set(stats)


def test_building_and_writing_a_segment_does_not_import_pandas(tmp_path: pathlib.Path) -> None:
    """``pa.array`` imports pandas on first use: about 0.2 s of CPU in every worker, measured under torchrun."""
    script = (
        "import sys, numpy as np\n"
        "from nbbatch._worker.segments import Segments, Settings\n"
        f"seg = Segments(Settings({str(tmp_path)!r}, 0), 'ab12', attempt=1, rank=0)\n"
        "seg.add(0, 0, 0, {'v': np.ones((4, 3), np.float32), 'k': np.arange(4), 'h': np.ones(4, np.float16)})\n"
        "assert seg.seal(1) and len(seg.drain()) == 1\n"
        "print('pandas' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=50, check=True)
    assert done.stdout.strip() == "False", done.stderr


def test_nothing_to_write_means_no_segment(tmp_path: pathlib.Path) -> None:
    seg = Segments(Settings(str(tmp_path), 0), RUN, attempt=1, rank=0)
    assert seg.seal(1) is False and seg.drain() == [] and not os.listdir(tmp_path)


def test_a_full_disk_is_reported_with_what_to_do(tmp_path: pathlib.Path) -> None:
    seg = Segments(Settings(str(tmp_path), 0), RUN, attempt=1, rank=0)
    text = seg._explain(OSError(errno.ENOSPC, "No space left on device"))  # noqa: SLF001
    assert f"the disk holding `{tmp_path}` is full" in text and "resume the run with the same `run_name`" in text
    seg = Segments(Settings(str(tmp_path / "file" / "below"), 0), RUN, attempt=1, rank=0)
    (tmp_path / "file").write_text("not a folder")
    seg.add(0, 0, 0, {"x": np.arange(3)})
    seg.seal(1)
    with pytest.raises(SegmentFailed, match="writing an output segment"):
        seg.drain()


def test_workers_use_segments_only_where_the_launcher_put_its_marker(tmp_path: pathlib.Path) -> None:
    assert settings(str(tmp_path), 1) is None  # another machine's folder: outputs go inline
    (tmp_path / "segments").mkdir()
    (tmp_path / "segments" / marker_name(1)).write_text(json.dumps({"inline_bytes": 123}))
    assert settings(str(tmp_path), 1) == Settings(str(tmp_path / "segments"), 123)
    assert settings(str(tmp_path), 2) is None
    assert batch_bytes({"v": np.zeros((4, 8), np.float32), "s": ["a"] * 4}) == 128 + 64


@pytest.fixture()
def con(tmp_path: pathlib.Path) -> duckdb.DuckDBPyConnection:
    db = duckdb.connect(str(tmp_path / "s.duckdb"))
    ensure_schema(db)
    db.execute("INSERT INTO runs (run_id, name, status, output_dir) VALUES (?, 'r', 'running', ?)",
               [RUN, str(tmp_path / "s_outputs" / RUN)])
    return db


def test_the_view_reads_committed_segments_with_their_ingest_types(con: duckdb.DuckDBPyConnection,
                                                                     tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "s_outputs" / RUN / "segments"
    events = [write_one(folder, step=1, rank=0, width=16), write_one(folder, step=1, rank=1, width=16)]
    orphan = write_one(folder, step=2, rank=0, width=16)  # written, never committed
    assert store_segments.view_sql(con, RUN, str(tmp_path / "s.duckdb")) is None
    store_segments.record(con, RUN, 1, events, None)
    sql = store_segments.view_sql(con, RUN, str(tmp_path / "s.duckdb"))
    assert sql is not None
    rel = con.sql(f"SELECT * FROM ({sql}) ORDER BY sample_index")
    assert dict(zip(rel.columns, map(str, rel.types)))["vector"] == "FLOAT[16]"
    assert [r[0] for r in rel.project("sample_index").fetchall()] == list(range(16))  # not the orphan's rows
    gone = store_segments.sweep(con, RUN, str(tmp_path / "s_outputs" / RUN))
    assert gone == [orphan.file] and sorted(os.listdir(folder)) == sorted(e.file for e in events)


def test_a_column_changing_type_or_case_between_segments_is_a_store_error(con: duckdb.DuckDBPyConnection,
                                                                          tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "s_outputs" / RUN / "segments"
    store_segments.record(con, RUN, 1, [write_one(folder, step=1, width=8)], None)
    from nbbatch._errors import StoreError

    with pytest.raises(StoreError, match="changed type between batches"):
        store_segments.record(con, RUN, 1, [write_one(folder, step=2, width=4)], None)
    seg = Segments(Settings(str(folder), 0), RUN, attempt=1, rank=0)
    seg.add(4, 2, 16, {"Vector": np.zeros((4, 8), np.float32)})
    seg.seal(3)
    with pytest.raises(StoreError, match="ignoring case"):
        store_segments.record(con, RUN, 1, seg.drain(), None)


def test_a_step_commits_only_with_the_segments_of_its_outputs() -> None:
    sharding = make_sharding(16, 4, 2)
    record = RunRecord(RUN, "r", "running", 1, sharding.planned_batches, "/tmp/x", frozenset(), ())
    sup = Supervisor(record, sharding, clock=lambda: 0.0)
    for rank in (0, 1):
        sup.handle(BatchDone(rank, rank, 0, 4, 0.0, 0.1))
        sup.handle(CheckpointDone(rank, 1, segment=rank == 0))
    assert sup.take_commit().batches == []  # rank 0's segment is not written yet
    segment = SegmentWritten(0, 1, segment_name(RUN, 1, 0, 1), 4, 100, "crc32:0", (0,), b"")
    sup.handle(segment)
    commit = sup.take_commit()
    assert sorted(b.global_batch for b, _ in commit.batches) == [0, 1] and commit.segments == [segment]


def test_a_segment_sent_before_its_checkpoint_is_kept_for_it() -> None:
    """A torchrun peer finishes its segment, then sends the checkpoint: both arrive in one gather."""
    sharding = make_sharding(8, 4, 1)
    record = RunRecord(RUN, "r", "running", 1, sharding.planned_batches, "/tmp/x", frozenset(), ())
    sup = Supervisor(record, sharding, clock=lambda: 0.0)
    segment = SegmentWritten(0, 1, segment_name(RUN, 1, 0, 1), 4, 100, "crc32:0", (0,), b"")
    sup.handle(BatchDone(0, 0, 0, 4, 0.0, 0.1))
    sup.handle(segment)
    sup.handle(CheckpointDone(0, 1, segment=True))
    commit = sup.take_commit()
    assert [b.global_batch for b, _ in commit.batches] == [0] and commit.segments == [segment]


def test_compact_refuses_a_segment_that_changed_after_its_commit(con: duckdb.DuckDBPyConnection,
                                                                  tmp_path: pathlib.Path) -> None:
    from nbbatch._errors import StoreError

    folder = tmp_path / "s_outputs" / RUN / "segments"
    events = [write_one(folder, step=1, rank=0), write_one(folder, step=1, rank=1)]
    store_segments.record(con, RUN, 1, events, None)
    (folder / events[1].file).write_bytes((folder / events[0].file).read_bytes())  # same shape, other bytes
    with pytest.raises(StoreError, match="does not match its checksum"):
        store_segments.compact(con, RUN, str(tmp_path / "s.duckdb"))
    assert sorted(store_segments.files(con, RUN)) == sorted(e.file for e in events)
    (folder / events[1].file).unlink()
    write_one(folder, step=1, rank=1)  # rewritten: the same bytes as committed
    assert store_segments.compact(con, RUN, str(tmp_path / "s.duckdb")) == (2, 16)
    assert len(store_segments.files(con, RUN)) == 1
