"""Tables in, tables out, with real worker processes and a real DuckDB store.

A `TableDataset` run snapshots its rows beside the store; workers read the snapshot; outputs join
back to their input rows (`Run.outputs(inputs=True)`, `run.sql`, `nbbatch export --with-inputs`);
a named run refuses changed inputs (`ResumeMismatch` on ``inputs``), from Python and the CLI.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import duckdb
import pytest
from helpers import SCRIPTS, nbbatch_cli  # helpers puts SCRIPTS on sys.path
from table_procs import Score

import nbbatch
from nbbatch import ResumeMismatch, TableDataset, WorkerFailed, torch_batch_process
from nbbatch._store import inputs

pytestmark = pytest.mark.timeout(180)

PROCS = SCRIPTS / "table_procs.py"


def write_source(path: pathlib.Path, n: int = 50, offset: int = 0) -> str:
    duckdb.sql(
        f"COPY (SELECT range AS id, 'item' || range AS name, (range + {offset}) * 1.5::DOUBLE AS x, "
        f"'row ' || range AS rank FROM range({n})) TO '{path}' (FORMAT parquet)"
    )
    return str(path)


def run(source: str, store: pathlib.Path, name: str, **kwargs: object) -> nbbatch.Run:
    options = {"batch_size": 8, "num_processes": 2, "checkpoint_interval": 1, "progress": False, **kwargs}
    return torch_batch_process(Score, TableDataset(source), store=str(store), run_name=name, **options)  # type: ignore[arg-type]


def test_outputs_joined_to_inputs(tmp_path: pathlib.Path) -> None:
    source = write_source(tmp_path / "in.parquet")
    result = run(source, tmp_path / "s.duckdb", "joined")
    assert result.status == "done"
    frame = result.outputs(inputs=True).df()
    # sample_index, the input columns (clashes prefixed), then the processor's outputs
    assert list(frame.columns) == ["sample_index", "id", "input_name", "x", "input_rank", "score", "name", "pid"]
    assert frame["sample_index"].tolist() == list(range(50)) == frame["id"].tolist()
    assert (frame["score"] == frame["x"] * 2).all()
    assert (frame["name"] == frame["input_name"].str.upper()).all()
    assert frame["input_rank"].tolist()[:2] == ["row 0", "row 1"]
    assert frame["pid"].nunique() == 2  # two real workers
    total = result.sql("SELECT count(*), sum(score) FROM inputs JOIN outputs USING (sample_index)").fetchall()
    assert total == [(50, sum(i * 3.0 for i in range(50)))]
    assert result.sql("SELECT * FROM inputs LIMIT 1").columns == ["sample_index", "id", "name", "x", "rank"]


def test_workers_read_the_snapshot_not_the_source(tmp_path: pathlib.Path) -> None:
    source = write_source(tmp_path / "in.parquet")

    class Overwrite(Score):
        def __init__(self, context: nbbatch.TorchBatchProcessorContext) -> None:
            super().__init__(context)
            if context.get_distributed_rank() == 0:  # the source changes after the run started
                write_source(pathlib.Path(source), offset=1000)

    result = torch_batch_process(Overwrite, TableDataset(source), batch_size=8, num_processes=2,
                                 store=str(tmp_path / "s.duckdb"), run_name="snap", progress=False)
    x = result.outputs(inputs=True).df()["x"].tolist()
    assert x == [i * 1.5 for i in range(50)]


def test_resume_reads_the_snapshot_and_refuses_changed_inputs(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write_source(tmp_path / "in.parquet")
    store = tmp_path / "s.duckdb"
    marker = tmp_path / "fail"
    marker.touch()
    monkeypatch.setenv("NBBATCH_TEST_FAIL_ID", "45")
    monkeypatch.setenv("NBBATCH_TEST_FAIL_FILE", str(marker))
    with pytest.raises(WorkerFailed, match="cannot score id 45"):
        run(source, store, "resumable")
    assert nbbatch.open_run("resumable", store=str(store)).counts["rows"] < 50

    write_source(pathlib.Path(source), n=51)  # a changed source is refused, naming `inputs`
    with pytest.raises(ResumeMismatch, match="inputs 50 rows.*51 rows") as info:
        run(source, store, "resumable")
    assert info.value.field == "inputs"

    write_source(pathlib.Path(source))  # the same rows again: the resume goes on from the snapshot
    marker.unlink()
    resumed = run(source, store, "resumable", num_processes=1)
    assert resumed.status == "done"
    frame = resumed.outputs(inputs=True).df()
    assert frame["sample_index"].tolist() == list(range(50))  # every row exactly once
    assert (frame["score"] == frame["x"] * 2).all()
    with pytest.raises(ResumeMismatch) as done_info:  # a finished run is refused too
        torch_batch_process(Score, list(range(50)), batch_size=8, store=str(store), run_name="resumable", progress=False)
    assert done_info.value.field == "inputs"


def test_outputs_with_inputs_needs_a_table_run(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"

    class Plain(nbbatch.TorchBatchProcessor):
        def __init__(self, context: nbbatch.TorchBatchProcessorContext) -> None:
            pass

        def process_batch(self, batch: object, batch_idx: int) -> object:
            return batch

    result = torch_batch_process(Plain, list(range(4)), batch_size=2, store=str(store), progress=False)
    with pytest.raises(nbbatch.InvalidArgument, match="did not start on a TableDataset"):
        result.outputs(inputs=True)


def test_missing_snapshot_is_a_clear_error(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    result = run(write_source(tmp_path / "in.parquet", n=10), store, "gone")
    for name in os.listdir(inputs.snapshot_dir(str(store))):
        os.unlink(os.path.join(inputs.snapshot_dir(str(store)), name))
    with pytest.raises(nbbatch.StoreError, match="input snapshot .* is missing"):
        result.outputs(inputs=True)
    assert result.outputs().count("*").fetchall() == [(10,)]


# -- CLI -------------------------------------------------------------------------------------------
def test_cli_table_run_export_and_resume(tmp_path: pathlib.Path) -> None:
    write_source(tmp_path / "in.parquet", n=40)
    store = str(tmp_path / "s.duckdb")
    marker = tmp_path / "fail"
    marker.touch()
    env = {"NBBATCH_TEST_FAIL_ID": "20", "NBBATCH_TEST_FAIL_FILE": str(marker)}
    query = "SELECT id, name, x FROM 'in.parquet' WHERE id < 30 ORDER BY id"  # relative: resumed from the same cwd
    first = nbbatch_cli("run", f"{PROCS}:Score", "--table", query, "--batch-size", "5", "--processes", "2",
                        "--checkpoint-interval", "1", "--name", "cli", "--store", store, cwd=tmp_path, env=env)
    assert first.returncode == 1, first.stderr
    marker.unlink()
    other = tmp_path / "elsewhere"
    other.mkdir()
    resumed = nbbatch_cli("resume", "cli", "--store", store, cwd=other, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "run 'cli' done: 6/6 batches, 30 rows" in resumed.stdout

    out = tmp_path / "out.parquet"
    exported = nbbatch_cli("export", "cli", "--with-inputs", "--to", str(out), "--store", store, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    rows = duckdb.sql(f"SELECT * FROM '{out}' ORDER BY sample_index")
    assert rows.columns == ["sample_index", "id", "input_name", "x", "score", "name", "pid"]
    assert rows.fetchall()[29][:5] == (29, 29, "item29", 29 * 1.5, 29 * 3.0)

    plain = nbbatch_cli("export", "cli", "--to", str(tmp_path / "plain.csv"), "--store", store, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr


def test_cli_table_usage_errors(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "s.duckdb")
    both = nbbatch_cli("run", f"{PROCS}:Score", "--table", "x.parquet", "--dataset", f"{PROCS}:Score", cwd=tmp_path)
    assert both.returncode == 2 and "give the data once" in both.stderr
    neither = nbbatch_cli("run", f"{PROCS}:Score", "--store", store, cwd=tmp_path)
    assert neither.returncode == 2 and "--dataset FACTORY" in neither.stderr and "--table SOURCE" in neither.stderr
    missing = nbbatch_cli("run", f"{PROCS}:Score", "--table", "missing.parquet", "--store", store, cwd=tmp_path)
    assert missing.returncode == 2 and "no such file" in missing.stderr, missing.stderr
    bad_sql = nbbatch_cli("run", f"{PROCS}:Score", "--table", "SELECT nope FROM range(3)", "--store", store, cwd=tmp_path)
    assert bad_sql.returncode == 2 and "failed in DuckDB" in bad_sql.stderr and "nope" in bad_sql.stderr
    empty = nbbatch_cli("run", f"{PROCS}:Score", "--table", "SELECT range AS id FROM range(0)", "--store", store,
                        cwd=tmp_path)
    assert empty.returncode == 2 and "returned no rows" in empty.stderr, empty.stderr


def test_cli_export_with_inputs_of_a_plain_run(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "s.duckdb")
    plain = nbbatch_cli("run", f"{SCRIPTS / 'procs.py'}:Double", "--dataset", f"{SCRIPTS / 'procs.py'}:numbers",
                        "--dataset-arg", "n=8", "--batch-size", "4", "--name", "plain", "--store", store, cwd=tmp_path)
    assert plain.returncode == 0, plain.stderr
    refused = nbbatch_cli("export", "plain", "--with-inputs", "--to", "o.parquet", "--store", store, cwd=tmp_path)
    assert refused.returncode == 2 and "drop --with-inputs" in refused.stderr


# -- dashboard and magic -----------------------------------------------------------------------------
def test_dashboard_outputs_page_shows_input_columns(tmp_path: pathlib.Path) -> None:
    from nbbatch._store import reader
    from nbbatch._ui.dashboard import queries

    store = tmp_path / "s.duckdb"
    run(write_source(tmp_path / "in.parquet", n=30), store, "dash")
    with reader.reading(str(store)) as con:
        run_id = reader.find_run(con, "dash")
        total, columns, rows = queries.outputs_page(con, run_id, page=1, page_size=5)
    assert total == 30
    assert columns == ["run_id", "rank", "batch_idx", "global_batch", "sample_index", "id", "input_name", "x",
                       "input_rank", "score", "name", "pid"]
    assert [r[4] for r in rows] == [5, 6, 7, 8, 9] and rows[0][6] == "item5" and rows[0][10] == "ITEM5"


def test_magic_table_option(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NBBATCH_STORE", raising=False)
    write_source(tmp_path / "in.parquet", n=20)
    shell = InteractiveShell.instance()
    try:
        shell.run_line_magic("load_ext", "nbbatch")
        shell.user_ns["Score"] = Score
        shell.run_line_magic(
            "batchprocess",
            """Score --table "SELECT * FROM 'in.parquet' WHERE id < 12 ORDER BY id" --batch-size 4 --processes 2 """
            "--name magic --no-progress",
        )
        result = shell.user_ns["_run"]
        assert result.status == "done" and result.outputs(inputs=True).df()["id"].tolist() == list(range(12))
        shell.run_line_magic("batchprocess", "Score --table in.parquet --name magic2 --no-progress --batch-size 10")
        assert shell.user_ns["_run"].counts["rows"] == 20
        with pytest.raises(UsageError, match="no such file"):
            shell.run_line_magic("batchprocess", "Score --table missing.parquet")
        with pytest.raises(UsageError, match="give the data once"):
            shell.run_line_magic("batchprocess", "Score data --table in.parquet")
        with pytest.raises(UsageError, match="failed in DuckDB"):
            shell.run_line_magic("batchprocess", "Score --table 'SELECT nope FROM range(2)'")
    finally:
        shell.run_line_magic("unload_ext", "nbbatch")
        InteractiveShell.clear_instance()


def test_example_runs_as_written(tmp_path: pathlib.Path) -> None:
    example = pathlib.Path(__file__).resolve().parents[2] / "examples" / "table_inference.py"
    done = subprocess.run([sys.executable, str(example), "--images", "40", "--batch-size", "8", "--store", "t.duckdb"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=170)
    assert done.returncode == 0, done.stderr
    assert ": done, 40 images" in done.stdout
    assert "img_00000.png" in done.stdout and "label  images  confidence" in done.stdout
    name = done.stdout.split("run '", 1)[1].split("'", 1)[0]
    result = nbbatch.open_run(name, store=str(tmp_path / "t.duckdb"))
    frame = result.outputs(inputs=True).df()
    assert frame["file_name"].tolist() == [f"img_{i:05d}.png" for i in range(40)]
    assert frame["confidence"].between(0, 1).all()
