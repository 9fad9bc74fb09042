"""Bad stores and clashing runs give clear errors, and nothing is lost."""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap
from typing import Any

import pytest
from helpers import poll, summary

import nbbatch
from nbbatch import ResumeMismatch, StoreBusy, StoreError, TorchBatchProcessor, torch_batch_process

pytestmark = pytest.mark.timeout(120)


class Echo(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        pass

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        return batch


class Other(Echo):
    pass


def go(store: pathlib.Path, data: Any = None, **kwargs: Any) -> nbbatch.Run:
    kwargs.setdefault("batch_size", 4)
    cls = kwargs.pop("cls", Echo)
    return torch_batch_process(cls, data if data is not None else list(range(20)), store=str(store), progress=False, **kwargs)


@pytest.mark.parametrize(
    "change,field",
    [
        ({"batch_size": 5}, "batch_size"),
        ({"data": list(range(21))}, "dataset_len"),
        ({"max_batches": 2}, "max_batches"),
        ({"cls": Other}, "processor"),
    ],
)
def test_resume_mismatch_names_the_field(tmp_path: pathlib.Path, change: dict[str, Any], field: str) -> None:
    store = tmp_path / "s.duckdb"
    go(store, run_name="fixed")
    with pytest.raises(ResumeMismatch) as info:
        go(store, run_name="fixed", **change)
    assert info.value.field == field and f"{field}=" in str(info.value) and "run_name" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_finished_run_is_returned_as_is(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    first = go(store, run_name="once")
    again = go(store, run_name="once", num_processes=2)
    assert again.id == first.id and again.status == "done" and again.counts["rows"] == 20


def test_corrupt_store_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    store.write_bytes(b"this is not a database" * 1000)
    with pytest.raises(StoreError, match="not a readable nbbatch store|cannot write the store") as info:
        go(store)
    assert "store=" in str(info.value)
    assert store.read_bytes().startswith(b"this is not a database"), "the file is left untouched"


def test_store_under_a_file_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="writable path"):
        go(blocker / "s.duckdb")


def test_store_path_that_is_a_folder_is_refused(tmp_path: pathlib.Path) -> None:
    with pytest.raises(nbbatch.InvalidArgument, match="file path"):
        go(tmp_path)


def test_second_live_run_from_another_process_is_refused(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    script = tmp_path / "slow.py"
    script.write_text(textwrap.dedent("""
        import sys, time
        from nbbatch import TorchBatchProcessor, torch_batch_process
        class Slow(TorchBatchProcessor):
            def __init__(self, context): pass
            def process_batch(self, batch, batch_idx):
                time.sleep(0.2)
                return batch
        torch_batch_process(Slow, list(range(60)), batch_size=2, store=sys.argv[1], run_name="slow", progress=False)
    """))
    proc = subprocess.Popen([sys.executable, str(script), str(store)], stderr=subprocess.DEVNULL)
    try:
        def row_exists() -> bool:
            assert proc.poll() is None, "the live run ended before its row could be read"
            return summary(store, "slow") is not None

        poll(row_exists, 60, "the live run's row", every=0.1)
        with pytest.raises(StoreBusy, match="in use by a live run .*'slow'"):
            go(store)
        # Reading the live store from here works and never breaks the run.
        assert nbbatch.open_run("slow", store=str(store)).status == "running"
    finally:
        proc.wait(timeout=90)
    assert proc.returncode == 0
    assert nbbatch.open_run("slow", store=str(store)).counts["rows"] == 60
