"""Workers write their outputs as segments; the store commits what makes them visible.

Real workers, a real DuckDB file, real Parquet segments. The crash tests kill a worker while its
segment is half written (the segment's ``.partial`` file is a FIFO the test reads from, so the
writer is provably mid-write), kill the launcher between a segment's write and its commit (a peer
holds the step open), and fill the disk under the segment folder. After each, a resume stores
every sample exactly once and no uncommitted segment is read or left behind.
"""

from __future__ import annotations

import fcntl
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
import torch
from helpers import fill, nbbatch_cli, poll, tiny_disk

import nbbatch
from nbbatch import TorchBatchProcessor, WorkerFailed, torch_batch_process
from nbbatch._store.connection import close_all

pytestmark = pytest.mark.timeout(180)

N, BS, WIDTH = 256, 16, 64
F_SETPIPE_SZ = 1031  # Linux fcntl: a pipe's buffer size


class Wide(TorchBatchProcessor):
    """A ``WIDTH``-float vector per sample (``vector[1] == sample_index``); test hooks by environment."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        rank = self.context.get_distributed_rank()
        output_dir = self.context._output_dir  # noqa: SLF001 - the run's folder, named by run id
        if os.environ.get("SEG_TEST_HOLD") and rank == 1 and batch_idx == 0:
            # Rank 1's first segment goes into a FIFO nobody reads: its write never ends, so step 1
            # never commits, while rank 0's first segment is complete on disk.
            os.mkfifo(output_dir / "segments" / f"seg-{output_dir.name}-a1-r1-s1.parquet.partial")
        fifo = os.environ.get("SEG_TEST_FIFO")  # rank 0's first segment goes into a FIFO the test reads
        if fifo and rank == 0 and batch_idx == 0:
            os.mkfifo(output_dir / "segments" / f"seg-{output_dir.name}-a1-r0-s1.parquet.partial")
            pathlib.Path(fifo + ".pid").write_text(str(os.getpid()))
            while not os.path.exists(fifo + ".ready"):  # the test holds the FIFO's read end open
                time.sleep(0.02)
        ballast = os.environ.get("SEG_TEST_BALLAST")
        if ballast and int(batch[0]) == 6 * BS and not os.path.exists(ballast):
            fill(ballast)
        self.total.update(int(batch.sum()))
        return {"vector": batch.float()[:, None] + torch.arange(WIDTH, dtype=torch.float32), "label": batch % 7,
                "noise": torch.rand(len(batch), 256)}  # incompressible: a segment is larger than a pipe buffer


def go(store: pathlib.Path, **kwargs: Any) -> nbbatch.Run:
    return torch_batch_process(Wide, list(range(N)), batch_size=BS, num_processes=2, checkpoint_interval=1,
                               store=str(store), run_name="wide", progress=False, **kwargs)


def check(run: nbbatch.Run) -> None:
    """Done, every sample once with its own vector, typed as before segments, and no orphan file."""
    assert run.status == "done", (run.status, run.error)
    rows = run.sql(
        "SELECT count(*), count(DISTINCT sample_index), count(*) FILTER (WHERE vector[1] = sample_index "
        f"AND vector[{WIDTH}] = sample_index + {WIDTH - 1} AND label = sample_index % 7) FROM outputs"
    ).fetchall()
    assert rows == [(N, N, N)], rows
    assert [s for (s,) in run.outputs().project("sample_index").fetchall()] == list(range(N))
    types = dict(zip(run.outputs().columns, map(str, run.outputs().types)))
    assert types["vector"] == f"FLOAT[{WIDTH}]" and types["label"] == "BIGINT", types
    assert run.reduced_metrics == {"total": sum(range(N))}
    committed = {f for (f,) in run.sql("SELECT file FROM segments WHERE run_id = $id", {"id": run.id}).fetchall()}
    assert committed, "the outputs went through segments"
    on_disk = {f for f in os.listdir(os.path.join(run.output_dir, "segments")) if f.startswith("seg-")}
    assert on_disk == committed, f"orphans left behind: {sorted(on_disk - committed)}"


@pytest.fixture(autouse=True)
def _segments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBBATCH_SEGMENTS", "1")  # every batch in segments, however small


def test_outputs_read_back_through_the_view_and_export(tmp_path: pathlib.Path) -> None:
    run = go(tmp_path / "s.duckdb")
    check(run)
    (total,) = run.sql("SELECT sum(rows) FROM segments WHERE run_id = $id", {"id": run.id}).fetchall()[0]
    assert total == N
    out = tmp_path / "out.parquet"
    done = nbbatch_cli("export", "wide", "--store", str(tmp_path / "s.duckdb"), "--to", str(out), timeout=120)
    assert done.returncode == 0, done.stderr
    import duckdb

    assert duckdb.sql(f"SELECT count(*), count(DISTINCT sample_index) FROM '{out}'").fetchall() == [(N, N)]


def test_compact_merges_segments_into_one_file_then_into_the_store(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "s.duckdb")
    run = go(tmp_path / "s.duckdb")
    before = run.sql("SELECT count(*) FROM segments WHERE run_id = $id", {"id": run.id}).fetchall()[0][0]
    assert before > 1
    del run
    close_all()
    compact = ["compact", "wide", "--store", store]
    done = nbbatch_cli(*compact, timeout=120)
    assert done.returncode == 0 and f"merged {before} segments ({N} rows)" in done.stdout, done.stderr
    run = nbbatch.open_run("wide", store=store)
    check(run)
    assert run.sql("SELECT count(*) FROM segments WHERE run_id = $id", {"id": run.id}).fetchall()[0][0] == 1
    del run
    close_all()
    done = nbbatch_cli(*compact, "--into-table", timeout=120)
    assert done.returncode == 0, done.stderr
    run = nbbatch.open_run("wide", store=store)
    assert [s for (s,) in run.outputs().project("sample_index").fetchall()] == list(range(N))
    types = dict(zip(run.outputs().columns, map(str, run.outputs().types)))
    assert types["vector"] == f"FLOAT[{WIDTH}]", types
    assert not [f for f in os.listdir(os.path.join(run.output_dir, "segments")) if f.startswith("seg-")]


def test_worker_killed_mid_segment_then_resume(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, fifo_flag = tmp_path / "s.duckdb", str(tmp_path / "fifo")
    monkeypatch.setenv("SEG_TEST_FIFO", fifo_flag)
    failure: list[BaseException] = []

    def launch() -> None:
        try:
            go(store)
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            failure.append(exc)

    launcher = threading.Thread(target=launch)
    launcher.start()
    pid = int(poll(lambda: os.path.exists(fifo_flag + ".pid") and pathlib.Path(fifo_flag + ".pid").read_text(), 60,
                   "the worker's pid"))
    fifo = next(pathlib.Path(tmp_path).glob("s_outputs/*/segments/*.partial"))
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.fcntl(reader, F_SETPIPE_SZ, 4096)  # the segment (> 16 KB) cannot fit: its writer blocks mid-file
        pathlib.Path(fifo_flag + ".ready").touch()

        def some_bytes() -> bytes | None:
            try:
                return os.read(reader, 1024) or None
            except BlockingIOError:
                return None

        poll(some_bytes, 60, "the first bytes of the segment")
        os.kill(pid, signal.SIGKILL)  # the segment's writer is inside its write: the file is half written
    finally:
        os.close(reader)
    launcher.join(120)
    assert isinstance(failure[0], WorkerFailed), failure
    monkeypatch.delenv("SEG_TEST_FIFO")
    run = go(store)
    check(run)
    assert not fifo.exists(), "the half-written segment was deleted on resume"


def test_launcher_killed_between_segment_write_and_commit(tmp_path: pathlib.Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s.duckdb"
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        sys.path.insert(0, {str(pathlib.Path(__file__).parents[1])!r})
        from test_segments import go
        go({str(store)!r})
    """))
    env = {**os.environ, "SEG_TEST_HOLD": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        # Rank 0 wrote its step-1 segment; rank 1's never ends, so no manifest names rank 0's.
        written = poll(lambda: next(pathlib.Path(tmp_path).glob("s_outputs/*/segments/seg-*-r0-s1.parquet"), None),
                       90, "rank 0's first segment")
        proc.kill()
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert nbbatch.open_run("wide", store=str(store)).status == "interrupted"
    run = go(store)
    check(run)
    assert not written.exists(), "the uncommitted segment was deleted on resume"


def test_full_disk_while_a_segment_is_written(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = tmp_path / "s.duckdb"  # the store on a roomy disk, the segments on a tiny one
    with tiny_disk(tmp_path / "s_outputs", "2m") as disk:
        ballast = disk / "ballast"
        monkeypatch.setenv("SEG_TEST_BALLAST", str(ballast))
        with pytest.raises(WorkerFailed):
            go(store)
        # The first rank to notice may be the peer whose collective broke; the cause is recorded either way.
        errors = nbbatch.open_run("wide", store=str(store)).errors().project("message").fetchall()
        assert any("is full while writing an output segment" in m and "run_name" in m for (m,) in errors), errors
        ballast.unlink()
        monkeypatch.delenv("SEG_TEST_BALLAST")
        run = go(store)
        check(run)
        del run
        close_all()


@pytest.mark.timeout(240)
def test_torchrun_ranks_on_one_machine_write_their_own_segments(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    job = pathlib.Path(__file__).resolve().parent / "scripts" / "torchrun_job.py"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(job),
         "--store", str(store), "--samples", "96", "--batch-size", "4", "--checkpoint-interval", "3", "--name", "tr"],
        cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=200,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run = nbbatch.open_run("tr", store=str(store))
    rows = run.sql("SELECT count(*), count(DISTINCT sample_index), count(*) FILTER (WHERE y = 2 * sample_index) "
                   "FROM outputs").fetchall()
    assert rows == [(96, 96, 96)], rows
    ranks = run.sql("SELECT DISTINCT rank FROM segments WHERE run_id = $id ORDER BY rank", {"id": run.id}).fetchall()
    assert ranks == [(0,), (1,)], "each rank wrote its own segments (the folder is on this machine)"
    assert [s for (s,) in run.outputs().project("sample_index").fetchall()] == list(range(96))
