"""The dashboard without a browser: its queries on a bulk-built store, its HTML, Stop/Resume rules, serving."""

from __future__ import annotations

import datetime as dt
import json
import pathlib
import sys
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import duckdb
import pytest
from helpers import poll

from nbbatch._store.connection import StoreOpenError, open_store
from nbbatch._store.lock import WriterLock
from nbbatch._ui.dashboard import control, queries, views

pytestmark = pytest.mark.timeout(60)

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
import dashboard_queries as bench

ROWS = 5000  # 79 batches of 64


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("dash") / "bench.duckdb")
    bench.build(path, ROWS, runs=3)
    return path


@pytest.fixture
def con(store: str) -> Iterator[duckdb.DuckDBPyConnection]:
    with open_store(store, write=False) as cursor:
        yield cursor


def test_runs_table_rows(con: duckdb.DuckDBPyConnection) -> None:
    rows = queries.runs(con, time.time())
    assert [r["name"] for r in rows] == ["run2", "run1", "run0"]  # newest first
    big = rows[-1]
    assert big["run_id"] == bench.RUN_ID and big["status"] == "done"
    assert big["progress"] == 100.0 and big["done_batches"] == big["total_batches"] == 79
    assert big["workers"] == 4 and big["errors"] == 100 and big["eta_s"] == 0.0
    assert big["duration_s"] == pytest.approx(50 * 60)
    assert big["items_per_s"] is not None and big["items_per_s"] > 0


def test_running_run_rate_eta_and_duration(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "live.duckdb")
    bench.build(path, 640, runs=1)  # 10 batches of 64
    t0 = dt.datetime(2025, 1, 1)
    con = duckdb.connect(path)
    con.execute("UPDATE runs SET status = 'running', finished_at = NULL")
    con.execute("DELETE FROM progress_log")
    con.execute("DELETE FROM batches WHERE global_batch >= 4")
    con.execute("UPDATE progress SET batches = 1, rows = 64, status = 'running'")  # 4 workers x 1 batch
    for t, rows in [(0, 0), (10, 128), (20, 256)]:
        con.execute("INSERT INTO progress_log VALUES (?, 1, ?, 0, ?, 0)", [bench.RUN_ID, t0 + dt.timedelta(seconds=t), rows])
    con.close()
    now = (t0 + dt.timedelta(seconds=30)).replace(tzinfo=dt.timezone.utc).timestamp()
    lock = WriterLock(path)  # a live writer: without one, a `running` row reads as interrupted
    try:
        with open_store(path, write=False) as cursor:
            (row,) = queries.runs(cursor, now)
    finally:
        lock.release()
    with open_store(path, write=False) as cursor:
        (gone,) = queries.runs(cursor, now)
    assert gone["status"] == "interrupted" and gone["eta_s"] is None
    assert row["status"] == "running"
    assert row["items_per_s"] == pytest.approx(12.8)  # the last 15 s of the log: (256 - 128) / 10 s
    assert row["done_batches"] == 4 and row["progress"] == pytest.approx(40.0)
    assert row["eta_s"] == pytest.approx(6 * 64 / 12.8)
    assert row["duration_s"] == pytest.approx(30.0)


def test_detail_workers_errors(con: duckdb.DuckDBPyConnection) -> None:
    detail = queries.run_detail(con, bench.RUN_ID)
    assert detail["config"] == {"batch_size": 64} and detail["reduced_metrics"] == {"accuracy": 0.5}
    workers = queries.workers(con, bench.RUN_ID, 1)
    assert [w["rank"] for w in workers] == [0, 1, 2, 3]
    total, errors = queries.errors(con, bench.RUN_ID, limit=10)
    assert total == 100 and len(errors) == 10
    assert errors[0]["global_batch"] == 99 and errors[0]["traceback"].startswith("Traceback")


def test_series_are_bucketed(con: duckdb.DuckDBPyConnection) -> None:
    points = queries.throughput(con, bench.RUN_ID, points=20)
    assert 0 < len(points) <= 21 and all(p["rate"] > 0 for p in points)
    series = queries.metric_series(con, bench.RUN_ID, points=10)
    assert sorted(series) == ["inference/accuracy", "inference/loss"]
    assert all(len(v) <= 10 for v in series.values())
    assert all(0 <= y <= 1 for v in series.values() for _, y in v)


def test_outputs_pages_follow_sample_index(con: duckdb.DuckDBPyConnection) -> None:
    total, columns, rows = queries.outputs_page(con, bench.RUN_ID, 3, page_size=20)
    assert total == ROWS
    assert columns[:5] == ["run_id", "rank", "batch_idx", "global_batch", "sample_index"]
    assert [r[4] for r in rows] == list(range(60, 80))
    assert str(rows[0][5]).endswith("(8)")  # a FLOAT[8] shown short
    _, _, last = queries.outputs_page(con, bench.RUN_ID, (ROWS - 1) // 20, page_size=20)
    assert [r[4] for r in last] == list(range(4980, 5000))
    assert queries.outputs_page(con, bench.RUN_ID, 10_000)[2] == []
    assert queries.outputs_page(con, "feedbeef", 0) == (0, ["run_id", "rank", "batch_idx", "global_batch", "sample_index"], [])


def test_outputs_table_name_is_checked(con: duckdb.DuckDBPyConnection) -> None:
    with pytest.raises(ValueError, match="invalid run id"):
        queries.outputs_page(con, "x; DROP TABLE runs", 0)


def test_views_escape_user_text() -> None:
    row = {"run_id": "ab", "name": "<script>x</script>", "status": "failed", "progress": 50.0, "done_batches": 1,
           "failed_batches": 0, "total_batches": 2, "items_per_s": None, "eta_s": None, "started_at": None,
           "duration_s": None, "workers": 2, "errors": 1}
    out = views.runs_html([row], "ab")
    assert "<script>x" not in out and "&lt;script&gt;x" in out and "nbb-selected" in out
    err = {"attempt": 1, "rank": 0, "global_batch": 2, "batch_idx": 1, "indices": list(range(20)),
           "exc_type": "ValueError", "message": "<b>", "traceback": "Traceback <x>", "fatal": False, "occurred_at": None}
    html = views.errors_html(1, [err])
    assert "&lt;b&gt;" in html and "Traceback &lt;x&gt;" in html and "0, 1, 2, 3, 4, 5, 6, 7, 8, 9, …" in html


def test_resume_rules() -> None:
    base = {"run_id": "ab", "name": "r", "attempt": 1}
    assert control.resume_blocker({**base, "status": "running"}) is None
    assert not control.can_resume({**base, "status": "running"})
    assert "only failed, preempted or interrupted" in str(control.resume_blocker({**base, "status": "done"}))
    note = control.resume_blocker({**base, "status": "preempted", "launch": None})
    assert note is not None and "defined in a notebook" in note and "run_name='r'" in note
    launch = {"target": "/x/p.py:P", "dataset": "/x/p.py:ds", "dataset_args": {}}
    assert control.can_resume({**base, "status": "failed", "launch": launch})
    assert control.can_resume({**base, "status": "interrupted", "launch": launch})
    with pytest.raises(ValueError, match="no launch info"):
        control.resume("s.duckdb", {**base, "status": "failed", "launch": None})
    cmd = control.resume_command("s.duckdb", "r")
    assert cmd[:5] == [sys.executable, "-m", "nbbatch", "resume", "--store"] and cmd[-2:] == ["--", "r"]


def test_refresh_keeps_last_data_when_the_store_is_locked(store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from nbbatch._ui.dashboard import app

    board = app.Dashboard(store)
    board.refresh()
    shown = board.runs_pane.object
    assert "run0" in shown and board.detail is not None and board.refreshes == 1
    assert "run2" in board.run_title.object  # the newest run is selected first

    def locked(*args: Any, **kwargs: Any) -> Any:
        raise StoreOpenError("the store `x` stayed locked by process 1")

    monkeypatch.setattr(app, "open_store", locked)
    board.refresh()
    assert board.runs_pane.object == shown and board.refreshes == 1
    assert "store not readable now" in board.status_line.object and "showing data from" in board.status_line.object


def test_serve_answers_on_localhost(store: str) -> None:
    import panel as pn

    from nbbatch._ui.dashboard import serve

    try:
        server = serve(store, port=0, threaded=True)
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/",
                                         headers={"Authorization": f"token {server.access.token}"})

        def answer() -> tuple[int, bytes] | None:
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.read()
            except OSError:
                return None

        status, body = poll(answer, 30, "the dashboard to answer on localhost", every=0.2)
        assert status == 200 and b"nbbatch" in body
    finally:
        pn.state.kill_all_servers()


def test_reduced_and_fingerprint_views() -> None:
    assert "No reduced metrics" in views.reduced_html({})
    assert "1.5" in views.reduced_html({"acc": 1.5})
    html = views.fingerprint_html({"run_id": "ab", "name": "r", "config": {"batch_size": 4}, "launch": None})
    assert "&quot;batch_size&quot;: 4" in html and "started from Python or a notebook" in html
    assert json.loads(queries.pretty_json({"a": 1})) == {"a": 1}


def test_outputs_pages_skip_gaps_left_by_skipped_batches(tmp_path: pathlib.Path) -> None:
    path = str(tmp_path / "gaps.duckdb")
    bench.build(path, 640, runs=1)
    con = duckdb.connect(path)
    con.execute(f"DELETE FROM outputs_{bench.RUN_ID} WHERE sample_index BETWEEN 8 AND 11")  # a skipped batch
    con.close()
    with open_store(path, write=False) as cursor:
        total, _, rows = queries.outputs_page(cursor, bench.RUN_ID, 1, page_size=20)
    assert total == 636
    assert [r[4] for r in rows] == list(range(24, 44))


SLOW_RUN = pathlib.Path(__file__).resolve().parents[1] / "ui" / "scripts" / "slow_run.py"


@pytest.fixture(scope="module")
def real_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A store written by a real run: 24 samples, batches of 4, 2 workers, the batch with sample 10 skipped."""
    import subprocess

    tmp = tmp_path_factory.mktemp("real")
    path = str(tmp / "real.duckdb")
    done = subprocess.run([sys.executable, str(SLOW_RUN), path, "real", "--n", "24", "--sleep", "0", "--fail-at", "10"],
                          cwd=tmp, capture_output=True, text=True, timeout=150, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return path


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_queries_on_a_store_a_real_run_wrote(real_store: str) -> None:
    with open_store(real_store, write=False) as con:
        (row,) = queries.runs(con, time.time())
        detail = queries.run_detail(con, row["run_id"])
        workers = queries.workers(con, row["run_id"], int(detail["attempt"]))
        total_errors, errors = queries.errors(con, row["run_id"])
        total, columns, rows = queries.outputs_page(con, row["run_id"], 0, page_size=15)
        _, _, rest = queries.outputs_page(con, row["run_id"], 1, page_size=15)
        metrics = queries.metric_series(con, row["run_id"])
        throughput = queries.throughput(con, row["run_id"])
    assert row["name"] == "real" and row["status"] == "done" and row["workers"] == 2
    assert row["progress"] == 100.0 and row["done_batches"] == 5 and row["failed_batches"] == 1
    assert row["total_batches"] == 6 and row["rows"] == 20 and row["errors"] == 1 and row["eta_s"] == 0.0
    assert row["duration_s"] is not None and row["duration_s"] > 0 and row["launch"] is None
    assert detail["reduced_metrics"] == {"total": sum(range(24)) - (8 + 9 + 10 + 11)}
    assert detail["batch_size"] == 4 and detail["processor"] == "slow_run.Slow"
    assert "batch_size" not in detail["config"]  # each option is stored once: in its own column
    assert [w["rank"] for w in workers] == [0, 1] and {w["status"] for w in workers} == {"done"}
    assert sum(w["rows"] for w in workers) == 20 and sum(w["failed"] for w in workers) == 1
    assert total_errors == 1 and errors[0]["exc_type"] == "ValueError" and list(errors[0]["indices"]) == [8, 9, 10, 11]
    assert "Traceback (most recent call last)" in errors[0]["traceback"] and not errors[0]["fatal"]
    assert total == 20 and columns[:5] == ["run_id", "rank", "batch_idx", "global_batch", "sample_index"]
    assert "y" in columns and "embedding" in columns
    assert [r[4] for r in rows + rest] == [*range(8), *range(12, 24)]  # each sample once, in order, the gap skipped
    assert [r[columns.index("y")] for r in rows[:3]] == [0, 2, 4]
    assert list(metrics) == ["inference/loss"] and len(metrics["inference/loss"]) == 5
    assert metrics["inference/loss"][0] == (0.0, 1.0)  # global_batch 0 reported 1 / (1 + sample 0)
    assert all(p["rate"] >= 0 for p in throughput)


def test_dashboard_object_for_a_notebook(store: str) -> None:
    import panel as pn

    import nbbatch

    board = nbbatch.dashboard(store, run="run1", refresh_ms=60_000)
    assert isinstance(board, pn.Column)
    state = board._nbbatch_dashboard
    assert "run1" in state.run_title.object and "run0" in state.runs_pane.object
    assert hasattr(board, "_repr_mimebundle_")  # Jupyter displays it inline


def test_import_nbbatch_does_not_load_panel() -> None:
    import subprocess

    code = "import sys, nbbatch; print('panel' in sys.modules, 'bokeh' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True).stdout
    assert out.split() == ["False", "False"]
