"""Store paths that cannot work, and a disk that fills up mid-run: clear `StoreError`s, and after
freeing space a resume completes with every sample exactly once. Real workers, a real DuckDB file
on a real (tiny tmpfs) disk."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import torch
from helpers import fill, tiny_disk

import nbbatch
from nbbatch import StoreError, TorchBatchProcessor, torch_batch_process

pytestmark = pytest.mark.timeout(150)

N, BS = 64, 4


class Wide(TorchBatchProcessor):
    """Returns a 64-float vector per sample; fills the disk at $NBBATCH_TEST_BALLAST once, on global batch 6."""

    def __init__(self, context: Any) -> None:
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        ballast = os.environ.get("NBBATCH_TEST_BALLAST")
        if ballast and int(batch[0]) == 6 * BS and not os.path.exists(ballast):
            fill(ballast)
        self.total.update(int(batch.sum()))
        return {"vector": batch.float()[:, None] + torch.arange(64, dtype=torch.float32)}


def go(store: pathlib.Path) -> nbbatch.Run:
    return torch_batch_process(Wide, list(range(N)), batch_size=BS, num_processes=2, checkpoint_interval=1,
                               store=str(store), run_name="wide", progress=False)


def test_full_disk_fails_the_run_then_resume_after_freeing_space(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with tiny_disk(tmp_path / "disk", "8m") as disk:
        store = disk / "s.duckdb"
        ballast = disk / "ballast"
        monkeypatch.setenv("NBBATCH_TEST_BALLAST", str(ballast))
        with pytest.raises(StoreError) as info:
            go(store)
        text = str(info.value)
        assert ballast.exists()
        assert f"the disk holding `{store}` is full" in text, text
        assert "while committing run 'wide'" in text and "Free space" in text and "`run_name='wide'`" in text
        # Its final status needs room on the same full disk: it is kept in the lock file, and readers show it.
        failed = nbbatch.open_run("wide", store=str(store))
        assert failed.status == "failed", (failed.status, failed.error)
        assert failed.error == text, "the run's error is the one the caller got"
        assert failed.counts["committed_batches"] < N // BS
        del failed

        ballast.unlink()  # free the space, and do not fill it again
        monkeypatch.delenv("NBBATCH_TEST_BALLAST")
        run = go(store)
        assert run.status == "done"
        samples = [s for (s,) in run.outputs().project("sample_index").fetchall()]
        assert samples == list(range(N)), "every sample exactly once after the resume"
        first = run.sql("SELECT vector[1], vector[64] FROM outputs WHERE sample_index = 10").fetchall()
        assert first == [(10.0, 73.0)]
        assert sorted(g for (g,) in run.batches().project("global_batch").fetchall()) == list(range(N // BS))
        assert run.reduced_metrics == {"total": sum(range(N))}
        del run
        nbbatch._store.connection.close_all()  # release the file so the tmpfs can go


def test_full_disk_before_the_run_is_a_store_error(tmp_path: pathlib.Path) -> None:
    with tiny_disk(tmp_path / "disk", "1m") as disk:
        fill(str(disk / "ballast"))
        store = disk / "s.duckdb"
        with pytest.raises(StoreError) as info:
            go(store)
        assert f"the disk holding `{store}` is full" in str(info.value) and "No space left" in str(info.value)
        nbbatch._store.connection.close_all()


def test_script_with_a_corrupt_store_exits_cleanly_with_the_error(tmp_path: pathlib.Path) -> None:
    # A StoreError right after the writer starts used to abort the interpreter at exit
    # ("terminate called ...", exit code 134) while a daemon thread was inside DuckDB.
    store = tmp_path / "s.duckdb"
    store.write_bytes(b"garbage" * 1000)
    script = tmp_path / "job.py"
    script.write_text(textwrap.dedent("""
        import sys
        from nbbatch import TorchBatchProcessor, torch_batch_process

        class Echo(TorchBatchProcessor):
            def __init__(self, context):
                pass

            def process_batch(self, batch, batch_idx):
                return batch

        torch_batch_process(Echo, list(range(8)), store=sys.argv[1], progress=False)
    """))
    done = subprocess.run([sys.executable, str(script), str(store)], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "StoreError: " in done.stderr and "is not a readable nbbatch store" in done.stderr
    assert "terminate called" not in done.stderr


@pytest.mark.parametrize("path", ["/dev/null/x.duckdb", "/proc/nbbatch/x.duckdb"])
def test_store_under_a_non_directory_is_a_store_error(path: str) -> None:
    with pytest.raises(StoreError, match=r"cannot write to the store `.*x\.duckdb` .*pass `store=` a writable path"):
        torch_batch_process(Wide, list(range(4)), store=path, progress=False)
