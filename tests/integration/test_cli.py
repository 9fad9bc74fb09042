"""The ``nbbatch`` command through real subprocesses: run, runs, show, export, resume, exit codes."""

from __future__ import annotations

import functools
import os
import pathlib
import signal
import subprocess
import sys

import duckdb
import pytest
from helpers import SCRIPTS, committed, nbbatch_cli, poll, summary

from nbbatch._store import reader

PROCS = SCRIPTS / "procs.py"
nbbatch = functools.partial(nbbatch_cli, timeout=90)


@pytest.mark.timeout(60)
def test_help_on_every_command_without_torch(tmp_path: pathlib.Path) -> None:
    top = nbbatch("--help", cwd=tmp_path)
    assert top.returncode == 0, top.stderr
    for command in ("run", "runs", "show", "resume", "export", "dashboard"):
        assert command in top.stdout
        sub = nbbatch(command, "--help", cwd=tmp_path)
        assert sub.returncode == 0, sub.stderr
        assert "Usage: nbbatch " + command in sub.stdout
    code = "import sys; from nbbatch._ui.cli import main; print(int('torch' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "0", "`nbbatch --help` must not import torch"


@pytest.mark.timeout(120)
def test_run_then_runs_show_export(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    run = nbbatch("run", f"{PROCS}:Double", "--dataset", f"{PROCS}:numbers", "--dataset-arg", "n=50",
                  "--batch-size", "4", "--processes", "2", "--name", "doubles", "--store", str(store), cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "run 'doubles' done: 13/13 batches, 50 rows" in run.stdout

    listed = nbbatch("runs", "--store", str(store), cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    header, row = listed.stdout.splitlines()[:2]
    assert header.split()[:3] == ["NAME", "STATUS", "BATCHES"]
    assert row.split()[:4] == ["doubles", "done", "13/13", "50"]

    shown = nbbatch("show", "doubles", "--store", str(store), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    fields = dict(line.split(":", 1) for line in shown.stdout.splitlines())
    assert fields["status"].strip() == "done"
    assert fields["rows"].strip() == "50"
    assert fields["reduced metrics"].strip() == '{"total": 1225}'
    run_id = summary(store, "doubles")["run_id"]  # type: ignore[index]
    assert fields["output dir"].strip() == str(tmp_path / "s_outputs" / str(run_id))  # by id, never by name
    launch = summary(store, "doubles")["launch"]  # type: ignore[index]
    assert launch == {"target": f"{PROCS}:Double", "dataset": f"{PROCS}:numbers", "dataset_args": {"n": 50},
                      "cwd": str(tmp_path)}

    parquet = tmp_path / "out.parquet"
    exported = nbbatch("export", "doubles", "--to", str(parquet), "--store", str(store), cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    rows = duckdb.sql(f"SELECT sample_index, y FROM read_parquet('{parquet}') ORDER BY sample_index").fetchall()
    assert [r[0] for r in rows] == list(range(50))
    assert all(y == 2 * i for i, y in rows)

    csv = tmp_path / "out.csv"
    assert nbbatch("export", "doubles", "--to", str(csv), "--store", str(store), cwd=tmp_path).returncode == 0
    assert duckdb.sql(f"SELECT count(DISTINCT sample_index) FROM read_csv('{csv}')").fetchall() == [(50,)]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_sigterm_preempts_and_resume_completes_exactly_once(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    proc = subprocess.Popen(
        [sys.executable, "-m", "nbbatch", "run", f"{PROCS}:Double", "--dataset", f"{PROCS}:numbers",
         "--dataset-arg", "n=160", "--batch-size", "2", "--processes", "2", "--checkpoint-interval", "2",
         "--name", "long", "--store", str(store)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "NBBATCH_TEST_SLEEP": "0.1"},
    )
    try:
        def four_committed() -> bool:
            if committed(store, "long") >= 4:
                return True
            assert proc.poll() is None, proc.communicate()
            return False

        poll(four_committed, 90, "4 committed batches", every=0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    s = summary(store, "long")
    assert s is not None and s["status"] == "preempted"
    assert 0 < s["committed_batches"] < 80  # type: ignore[operator]

    resumed = nbbatch("resume", "long", "--store", str(store), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    s = summary(store, "long")
    assert s is not None and s["status"] == "done" and s["attempt"] == 2
    assert s["reduced_metrics"] == {"total": sum(range(160))}
    with reader.reading(str(store)) as con:
        counts = con.execute(
            f"SELECT count(*), count(DISTINCT sample_index), min(sample_index), max(sample_index) "
            f"FROM outputs_{s['run_id']}"
        ).fetchall()
    assert counts == [(160, 160, 0, 159)]


@pytest.mark.timeout(90)
@pytest.mark.parametrize(
    ("target", "dataset", "message"),
    [
        ("no_such_module:Thing", "numbers", "no module named `no_such_module`"),
        (f"{PROCS}:Missing", "numbers", "has no attribute `Missing`"),
        (f"{PROCS}:not_a_processor", "numbers", "is a function, not a TorchBatchProcessor subclass"),
        ("missing-colon", "numbers", "must look like `package.module:attr`"),
        (f"{PROCS}:Double", "not_a_processor", "raised TypeError"),
    ],
)
def test_bad_usage_exits_2_without_traceback(tmp_path: pathlib.Path, target: str, dataset: str, message: str) -> None:
    result = nbbatch("run", target, "--dataset", f"{PROCS}:{dataset}", "--store", str(tmp_path / "s.duckdb"),
                     cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(90)
def test_failing_processor_exits_1_with_the_error(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    result = nbbatch("run", f"{PROCS}:Failing", "--dataset", f"{PROCS}:numbers", "--dataset-arg", "n=40",
                     "--batch-size", "4", "--name", "bad", "--store", str(store), "--no-progress", cwd=tmp_path,
                     env={"NBBATCH_TEST_FAIL_AT": "10"})
    assert result.returncode == 1, result.stderr
    assert "ValueError: cannot process sample 10" in result.stderr
    assert "Traceback" not in result.stderr
    s = summary(store, "bad")
    assert s is not None and s["status"] == "failed"
    assert "Traceback" in str(s["error"])  # the worker's traceback is kept in the store
    shown = nbbatch("show", "bad", "--store", str(store), cwd=tmp_path)
    assert shown.returncode == 0
    assert "ValueError x1" in shown.stdout and "nbbatch resume bad" in shown.stdout


@pytest.mark.timeout(60)
def test_resume_without_launch_info_exits_2(tmp_path: pathlib.Path) -> None:
    from nbbatch._store.records import RunSpec
    from nbbatch._store.writer import StoreWriter

    store = tmp_path / "s.duckdb"
    writer = StoreWriter(str(store))
    try:
        record = writer.begin(RunSpec(
            name="notebook", processor="P", dataset_len=10, batch_size=2, max_batches=None, checkpoint_interval=5,
            world_size=1, planned_batches=5, real_batches=5, on_error="raise", max_failures=None,
            output_root=str(tmp_path), launch=None, config={},
        ))
        writer.finish(record, "failed", None, "boom")
    finally:
        writer.close()
    result = nbbatch("resume", "notebook", "--store", str(store), cwd=tmp_path)
    assert result.returncode == 2
    assert "was not started by `nbbatch run`" in result.stderr and "run_name='notebook'" in result.stderr
    assert "Traceback" not in result.stderr
    missing = nbbatch("show", "nope", "--store", str(store), cwd=tmp_path)
    assert missing.returncode == 2 and "no run named 'nope'" in missing.stderr


def test_dataset_args_parse_as_json_else_string() -> None:
    from nbbatch._ui.targets import UsageFailure, parse_args

    assert parse_args(["n=10", "train=false", "name=cifar", "sizes=[1, 2]", "x=1.5"]) == {
        "n": 10, "train": False, "name": "cifar", "sizes": [1, 2], "x": 1.5,
    }
    with pytest.raises(UsageFailure):
        parse_args(["no-equals"])
