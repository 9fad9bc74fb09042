"""The ways to serve the dashboard, each in Chromium: ``nbbatch dashboard``, ``panel serve dashboard/app.py``,
and ``nbbatch run ... --dashboard`` (served from the process that writes the store).
"""

from __future__ import annotations

import pathlib
import re
import sys
from typing import Any

import pytest
from conftest import SLOW_RUN, cli_run_args, free_port, output, poll, printed_url, wait_http

pytestmark = [pytest.mark.ui, pytest.mark.slow]

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished_store(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A store holding one finished run ("small": 24 samples, the batch with sample 10 skipped)."""
    import subprocess

    tmp = tmp_path_factory.mktemp("served")
    store = tmp / "served.duckdb"
    done = subprocess.run([sys.executable, str(SLOW_RUN), str(store), "small", "--n", "24", "--sleep", "0",
                           "--fail-at", "10"], cwd=tmp, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return store


def runs_table(page: Any) -> str:
    loc = page.locator(".nbb-runs")
    return loc.inner_text() if loc.count() else ""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("how", ["nbbatch dashboard", "panel serve"])
def test_served_by_a_command(how: str, finished_store: pathlib.Path, page: Any, spawn: Any) -> None:
    if how == "nbbatch dashboard":  # --port 0: the printed URL has the real port and the token
        server = spawn([sys.executable, "-m", "nbbatch", "dashboard", "--store", str(finished_store), "--port", "0"])
        url = printed_url(server)
        assert re.fullmatch(r"http://127\.0\.0\.1:(\d+)/\?token=[0-9a-f]{48}", url), url
        assert not url.startswith("http://127.0.0.1:0/"), url
    else:
        port = free_port()
        server = spawn([sys.executable, "-m", "panel", "serve", str(ROOT / "dashboard" / "app.py"), "--port",
                        str(port), "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}",
                        "--args", "--store", str(finished_store)])
        url = f"http://127.0.0.1:{port}/app"
    try:
        wait_http(url, timeout=90)
    except AssertionError:  # wait_http's timeout
        pytest.fail(f"{how} did not serve: {output(server)}")
    page.goto(url)
    poll(lambda: "small" in runs_table(page), 60, "the run in the runs table")
    table = runs_table(page)
    assert "done" in table and "100%" in table and "(5/6, 1 failed)" in table, table
    assert re.search(r"total\s+" + str(sum(range(24)) - (8 + 9 + 10 + 11)), page.locator(".nbb-reduced").inner_text())
    assert server.poll() is None, output(server)  # still serving: it ends when the test kills it


@pytest.mark.timeout(180)
def test_cli_run_serves_its_own_dashboard(tmp_path: pathlib.Path, page: Any, spawn: Any) -> None:
    store = tmp_path / "own.duckdb"
    gate = tmp_path / "gate"  # the run waits for it, so it is still running when the page shows it
    run = spawn(cli_run_args(str(store), "with-dashboard", 120, "--dashboard", "--dashboard-port", "0"), sleep=0.1,
                gate=gate)
    url = printed_url(run)
    assert ":0/" not in url and "?token=" in url, url
    try:
        wait_http(url, timeout=90)
    except AssertionError:  # wait_http's timeout
        pytest.fail(f"`nbbatch run --dashboard` did not serve: {output(run)}")
    page.goto(url)
    poll(lambda: "with-dashboard" in runs_table(page) and "running" in runs_table(page), 90,
         "the run to show as running on its own dashboard")
    gate.touch()
    assert run.wait(timeout=120) == 0, output(run)  # the dashboard reading the store never broke the run
    assert "'with-dashboard' done: 30/30 batches, 120 rows, 0 errors" in output(run), output(run)
