"""Hostile names and values, through real worker processes and a real DuckDB file (issue 9).

Output keys that are SQL (first flush, later flush, only after a resume), keys equal ignoring
case, run names that are paths or options, old stores with such names, a dashboard Resume of a
run named ``--help``, a NaN ``batch_timeout``, bad magic options, and unpicklable outputs.
"""

from __future__ import annotations

import os
import pathlib
import threading
from typing import Any

import duckdb
import pytest
import torch
from helpers import SCRIPTS, committed, nbbatch_cli, poll

import nbbatch
from nbbatch import InvalidArgument, InvalidRunName, TorchBatchProcessor, WorkerFailed, torch_batch_process
from nbbatch._store import columns as store_columns
from nbbatch._store import flush, reader
from nbbatch._store.sql import ident
from nbbatch._ui.dashboard import control, queries

pytestmark = pytest.mark.timeout(120)

DROP = 'b" INTEGER; DROP TABLE runs; COMMIT; --'
QUOTE = 'he said "hi"'
N = 24


def go(tmp_path: pathlib.Path, cls: type, **kwargs: Any) -> nbbatch.Run:
    options: dict[str, Any] = {"batch_size": 4, "checkpoint_interval": 1, "num_processes": 1, "progress": False,
                               "store": str(tmp_path / "s.duckdb"), **kwargs}
    return torch_batch_process(cls, list(range(N)), **options)


class Hostile(TorchBatchProcessor):
    """``x`` always; the hostile keys from batch ``start`` on, once the batches before it are committed
    (so with ``start > 0`` they reach the store in a later flush, through ``ALTER TABLE``)."""

    start = 0

    def __init__(self, context: Any) -> None:
        self.context = context

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        out: dict[str, Any] = {"x": batch * 10}
        if batch_idx == self.start and self.start:
            store, name = os.environ["NBBATCH_TEST_STORE"], os.environ["NBBATCH_TEST_NAME"]
            poll(lambda: committed(store, name) >= self.start, 60, f"the {self.start} batches before it to commit")
        if batch_idx >= self.start:
            out[DROP] = batch * 2
            out[QUOTE] = [f"v{int(b)}" for b in batch]
        return out


class LaterFlush(Hostile):
    start = 3


class FirstFails(Hostile):
    """Attempt 1 returns only ``x`` and fails at batch 3; the resumed attempt adds the hostile keys."""

    start = 10**9

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        if os.environ.get("NBBATCH_TEST_FIXED") != "1":
            if batch_idx == 3:
                raise ValueError("first attempt stops here")
            return {"x": batch * 10}
        return {"x": batch * 10, DROP: batch * 2, QUOTE: [f"v{int(b)}" for b in batch]}


def check_hostile_columns(run: nbbatch.Run, store: pathlib.Path, tmp_path: pathlib.Path, first: int) -> None:
    """Every reader sees the hostile keys as columns; samples before ``first`` hold NULL there."""
    assert run.status == "done"
    assert list(run.outputs().columns)[-3:] == ["x", DROP, QUOTE]
    rows = run.sql(f"SELECT sample_index, x, {ident(DROP)}, {ident(QUOTE)} FROM outputs ORDER BY sample_index").fetchall()
    assert [r[0] for r in rows] == list(range(N))
    expected = [(i, i * 10, i * 2 if i >= first else None, f"v{i}" if i >= first else None) for i in range(N)]
    assert rows == expected
    assert [r.name for r in nbbatch.list_runs(store=str(store))] == [run.name]  # `runs` is still there
    df = run.outputs().df()
    assert df[DROP].isna().sum() == first
    parquet = tmp_path / "out.parquet"
    done = nbbatch_cli("export", run.name, "--to", str(parquet), "--store", str(store), timeout=90)
    assert done.returncode == 0, done.stderr
    exported = duckdb.sql(f"SELECT * FROM read_parquet('{parquet}') ORDER BY sample_index")
    assert exported.columns[-3:] == ["x", DROP, QUOTE] and len(exported.fetchall()) == N
    with reader.reading(str(store)) as con:
        total, columns, page = queries.outputs_page(con, run.id, 0, page_size=5)
    assert total == N and columns[-2:] == [DROP, QUOTE] and len(page) == 5


def table_before_each_flush(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, ...]]:
    """The outputs table's columns as each flush found them (the launcher writes in this process)."""
    seen: list[tuple[str, ...]] = []
    insert = flush.insert_outputs

    def recording(con: Any, run_id: str, data: Any) -> None:
        seen.append(store_columns.output_columns(con, run_id))
        insert(con, run_id, data)

    monkeypatch.setattr(flush, "insert_outputs", recording)
    return seen


@pytest.mark.parametrize("cls", [Hostile, LaterFlush], ids=["first-flush", "later-flush"])
def test_hostile_keys_round_trip_as_columns(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
    store = tmp_path / "s.duckdb"
    monkeypatch.setenv("NBBATCH_TEST_STORE", str(store))
    monkeypatch.setenv("NBBATCH_TEST_NAME", "hostile")
    flushes = table_before_each_flush(monkeypatch)
    run = go(tmp_path, cls, run_name="hostile")
    check_hostile_columns(run, store, tmp_path, first=4 * cls.start)
    if cls.start:  # the keys came in a later flush, through `ALTER TABLE ... ADD COLUMN`
        assert any(cols and DROP not in cols for cols in flushes), flushes
    else:
        assert flushes[0] == ()


def test_hostile_keys_that_appear_only_after_a_resume(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(WorkerFailed, match="first attempt stops here"):
        go(tmp_path, FirstFails, run_name="resumed")
    monkeypatch.setenv("NBBATCH_TEST_FIXED", "1")
    flushes = table_before_each_flush(monkeypatch)
    run = go(tmp_path, FirstFails, run_name="resumed")
    assert run.summary["attempt"] == 2
    assert flushes[0] == ("run_id", "rank", "batch_idx", "global_batch", "sample_index", "x")  # attempt 1's table
    check_hostile_columns(run, tmp_path / "s.duckdb", tmp_path, first=12)


# --- keys equal ignoring case -----------------------------------------------------------------


class CaseKeys(TorchBatchProcessor):
    """Batch 1 returns keys that clash ignoring case (``$NBBATCH_TEST_CLASH``: ``pair`` or ``reserved``)."""

    def __init__(self, context: Any) -> None:
        pass

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        if batch_idx != 1:
            return {"x": batch}
        if os.environ["NBBATCH_TEST_CLASH"] == "pair":
            return {"x": batch, "X": batch + 1}
        return {"x": batch, "Sample_Index": batch}


@pytest.mark.parametrize("clash,text", [("pair", "output key 'X' equals 'x'"),
                                        ("reserved", "output key 'Sample_Index' equals 'sample_index'")])
def test_keys_equal_ignoring_case_raise_for_the_batch(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                      clash: str, text: str) -> None:
    monkeypatch.setenv("NBBATCH_TEST_CLASH", clash)
    with pytest.raises(WorkerFailed, match=text) as info:
        go(tmp_path, CaseKeys)
    assert info.value.batch_idx == 1 and info.value.indices == [4, 5, 6, 7]
    assert "rename one of them" in str(info.value)


@pytest.mark.parametrize("clash,text", [("pair", "'X' equals 'x'"), ("reserved", "'Sample_Index' equals 'sample_index'")])
def test_keys_equal_ignoring_case_are_skipped_batches(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch,
                                                      clash: str, text: str) -> None:
    monkeypatch.setenv("NBBATCH_TEST_CLASH", clash)
    run = go(tmp_path, CaseKeys, on_error="skip", num_processes=2)
    assert run.status == "done"
    errors = run.errors().fetchall()
    names = run.errors().columns
    assert len(errors) == 2  # batch_idx 1 of both workers
    for row in errors:
        error = dict(zip(names, row))
        assert error["exc_type"] == "OutputError" and text in error["message"] and not error["fatal"]
        assert error["indices"] == list(range(4 * error["global_batch"], 4 * error["global_batch"] + 4))
    assert list(run.outputs().columns) == ["run_id", "rank", "batch_idx", "global_batch", "sample_index", "x"]
    assert run.outputs().count("*").fetchall() == [(N - 8,)]


class ScoreThenSCORE(TorchBatchProcessor):
    """Attempt 1 stores ``score`` and fails at batch 3; the resume returns ``Score``."""

    def __init__(self, context: Any) -> None:
        pass

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        if os.environ.get("NBBATCH_TEST_FIXED") == "1":
            return {"Score": batch}
        if batch_idx == 3:
            raise ValueError("first attempt stops here")
        return {"score": batch}


def test_a_key_differing_in_case_from_a_stored_column_is_a_batch_error(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(WorkerFailed, match="first attempt stops here"):
        go(tmp_path, ScoreThenSCORE, run_name="score")
    monkeypatch.setenv("NBBATCH_TEST_FIXED", "1")
    with pytest.raises(WorkerFailed, match="output key 'Score' equals 'score'") as info:
        go(tmp_path, ScoreThenSCORE, run_name="score")
    assert info.value.batch_idx == 3
    run = go(tmp_path, ScoreThenSCORE, run_name="score", on_error="skip")
    assert run.status == "done"
    messages = [m for (m,) in run.errors().filter("NOT fatal").project("message").fetchall()]
    assert len(messages) == 3 and all("output key 'Score' equals 'score'" in m for m in messages)
    assert run.outputs().count("*").fetchall() == [(12,)]  # only attempt 1's batches


# --- run names and where runs write -----------------------------------------------------------


class Files(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        self.context = context

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        with self.context.upload_path() as path:
            (path / f"batch_{batch_idx}.txt").write_text(str(batch.tolist()))
        board = self.context.get_tensorboard_path()
        (board / "events").write_text("x")
        if os.environ.get("NBBATCH_TEST_FIXED") != "1" and batch_idx == 2:
            raise ValueError("first attempt stops here")
        return {"x": batch}


@pytest.mark.parametrize("name", ["../../x", "/tmp/abs", "--help", "-x", ".hidden", "a b", "a/b", "é", ""])
def test_unsafe_run_names_are_refused_before_anything_runs(tmp_path: pathlib.Path, name: str) -> None:
    with pytest.raises(InvalidRunName, match=r"letters, digits and `\._-`, not starting with `-` or `\.`") as info:
        go(tmp_path, Files, run_name=name)
    assert isinstance(info.value, ValueError) and isinstance(info.value, InvalidArgument)
    assert not list(tmp_path.iterdir())  # no store, no folder: refused in the caller


def test_cli_refuses_an_unsafe_name_with_exit_2(tmp_path: pathlib.Path) -> None:
    procs = SCRIPTS / "procs.py"
    done = nbbatch_cli("run", f"{procs}:Double", "--dataset", f"{procs}:numbers", "--name", "../escape", "--store",
                       str(tmp_path / "s.duckdb"), cwd=tmp_path, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Invalid value for '--name'" in done.stderr and "not starting with `-` or `.`" in done.stderr
    assert "Traceback" not in done.stderr and not list(tmp_path.iterdir())


def test_files_land_in_a_folder_named_by_run_id(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBBATCH_TEST_FIXED", "1")
    run = go(tmp_path, Files, run_name="files.v1")
    folder = tmp_path / "s_outputs" / run.id
    assert run.output_dir == str(folder)
    assert sorted(p.name for p in (folder / "rank_0").iterdir())[:2] == ["batch_0.txt", "batch_1.txt"]
    assert (folder / "tensorboard" / "rank_0" / "events").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.duckdb", "s.duckdb.lock", "s_outputs"]


def test_an_old_store_with_unsafe_names_still_opens_and_resumes_inside_the_store_folder(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(WorkerFailed):
        go(tmp_path, Files, run_name="victim")
    store = str(tmp_path / "s.duckdb")
    outside = tmp_path / "outside"
    run_id = nbbatch.open_run("victim", store=store).id
    # What an older nbbatch (names as folders), or a store from elsewhere, holds:
    with duckdb.connect(store) as con:
        con.execute("UPDATE runs SET name = '../../evil', output_dir = ? WHERE run_id = ?", [str(outside), run_id])
    old = nbbatch.open_run("../../evil", store=store)
    assert old.status == "failed" and old.counts["committed_batches"] == 2
    monkeypatch.setenv("NBBATCH_TEST_FIXED", "1")
    run = go(tmp_path, Files, run_name=run_id)  # a run whose name breaks the rule resumes by its id
    assert run.status == "done" and run.name == "../../evil"
    assert run.output_dir == str(tmp_path / "s_outputs" / run_id) and not outside.exists()
    assert run.outputs().count("*").fetchall() == [(N,)]


DASHBOARD_PROCS = '''
import os
from nbbatch import TorchBatchProcessor

class Flaky(TorchBatchProcessor):
    def __init__(self, context):
        pass
    def process_batch(self, batch, batch_idx):
        if os.path.exists(os.path.join(os.path.dirname(__file__), "fail")) and batch_idx == 2:
            raise ValueError("first attempt stops here")
        return {"x": batch}

def numbers(n=24):
    return list(range(n))
'''


@pytest.mark.timeout(180)
def test_dashboard_resume_of_a_run_named_like_an_option(tmp_path: pathlib.Path) -> None:
    """A run an older store named ``--help``: Resume resumes it instead of printing help (issue 9)."""
    (tmp_path / "flaky.py").write_text(DASHBOARD_PROCS)
    (tmp_path / "fail").write_text("")
    store = str(tmp_path / "s.duckdb")
    first = nbbatch_cli("run", f"{tmp_path}/flaky.py:Flaky", "--dataset", f"{tmp_path}/flaky.py:numbers", "--batch-size",
                        "4", "--checkpoint-interval", "1", "--processes", "1", "--name", "flaky", "--store", store,
                        "--no-progress", cwd=tmp_path, timeout=90)
    assert first.returncode == 1, first.stderr
    (tmp_path / "fail").unlink()
    with duckdb.connect(store) as con:
        con.execute("UPDATE runs SET name = '--help' WHERE name = 'flaky'")
    with reader.reading(store) as con:
        detail = reader.run_summary(con, "--help")
    assert control.resume_command(store, "--help")[-2:] == ["--", "--help"]
    message = control.resume(store, detail)
    assert "Resuming run '--help'" in message
    run = nbbatch.open_run("--help", store=store)
    poll(lambda: run.status == "done", 150, f"the resumed run to finish ({message})")
    poll(lambda: not control.resuming(run.id), 30, "the resume process to exit")
    assert run.summary["attempt"] == 2 and run.outputs().count("*").fetchall() == [(N,)]
    log = next((tmp_path / "s_outputs" / run.id).glob("resume-attempt*.log")).read_text()
    assert "Usage:" not in log, log


# --- smaller gaps -----------------------------------------------------------------------------


@pytest.mark.parametrize("timeout", [float("nan"), float("inf"), -1.0, 0, True, "5"])
def test_batch_timeout_must_be_a_finite_positive_number(tmp_path: pathlib.Path, timeout: Any) -> None:
    with pytest.raises(InvalidArgument, match="`batch_timeout` must be a finite positive number of seconds"):
        go(tmp_path, Files, batch_timeout=timeout)
    assert not list(tmp_path.iterdir())


def test_magic_bad_numbers_are_one_line_usage_errors(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.chdir(tmp_path)
    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "nbbatch")
        shell.user_ns.update({"Files": Files, "data": list(range(8))})
        for options in ("--batch-size 0", "--processes 0", "--name ../x", "--max-failures -1"):
            with pytest.raises(UsageError) as info:
                shell.run_line_magic("batchprocess", f"Files data {options} --no-progress")
            assert type(info.value) is UsageError and "\n" not in str(info.value), options
        assert not list(tmp_path.iterdir())
    finally:
        shell.run_line_magic("unload_ext", "nbbatch")
        InteractiveShell.clear_instance()


class Unpicklable(TorchBatchProcessor):
    """Batch 1 returns a lock per sample, which cannot travel to the launcher."""

    def __init__(self, context: Any) -> None:
        pass

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        handles = [threading.Lock() for _ in batch] if batch_idx == 1 else [f"ok{int(b)}" for b in batch]
        return {"x": batch, "handle": handles}


def test_an_unpicklable_output_is_a_skipped_batch(tmp_path: pathlib.Path) -> None:
    run = go(tmp_path, Unpicklable, on_error="skip", num_processes=2)
    assert run.status == "done"
    errors = [dict(zip(run.errors().columns, row)) for row in run.errors().fetchall()]
    assert sorted(e["global_batch"] for e in errors) == [2, 3]  # batch_idx 1 of both workers
    for e in errors:
        assert e["batch_idx"] == 1 and e["indices"] == list(range(4 * e["global_batch"], 4 * e["global_batch"] + 4))
        assert "output 'handle' holds a value that cannot be pickled" in e["message"] and "`str(x)`" in e["message"]
    assert run.outputs().count("*").fetchall() == [(N - 8,)]


def test_an_unpicklable_output_under_raise_names_the_batch(tmp_path: pathlib.Path) -> None:
    with pytest.raises(WorkerFailed, match="failed in process_batch at batch_idx 1") as info:
        go(tmp_path, Unpicklable)
    assert info.value.batch_idx == 1 and "outside a batch" not in str(info.value)
    assert "output 'handle' holds a value that cannot be pickled" in str(info.value)


def test_outputs_of_a_tensor_key_named_like_sql(tmp_path: pathlib.Path) -> None:
    """The single-tensor path and the dict path agree on quoting: `output` and a key named `select`."""

    run = go(tmp_path, SelectKey)
    assert run.sql('SELECT sum("select") FROM outputs').fetchall() == [(float(sum(range(N))),)]


class SelectKey(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        pass

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        return {"select": batch.to(torch.float32), "from": [str(int(b)) for b in batch]}
