"""The served dashboard in Chromium, watching real runs that other processes write.

Each test starts runs with `scripts/slow_run.py` (2 workers, a sleeping processor) in a
subprocess, serves the dashboard in this process (threaded, free port) and drives it with
Playwright: live progress, reduced metrics, errors, outputs paging, Stop, and Resume through
``nbbatch resume``. Screenshots land in ``docs/`` with ``NBBATCH_UPDATE_SCREENSHOTS=1``.
"""

from __future__ import annotations

import os
import pathlib
import re
import signal
from typing import Any

import pytest
from conftest import cli_run_args, output, poll
from helpers import summary

from nbbatch._store import reader
from nbbatch._ui.dashboard import control

pytestmark = [pytest.mark.ui, pytest.mark.slow]


def title(page: Any) -> str:
    """The selected run's heading: ``NAME STATUS P% · d/t batches · r rows stored``."""
    loc = page.locator(".nbb-title")
    return loc.inner_text() if loc.count() else ""


def status_of(page: Any) -> str | None:
    match = re.search(r"\b(running|done|failed|preempted|interrupted)\b", title(page))
    return match.group(1) if match else None


def percent(page: Any) -> int | None:
    match = re.search(r"(\d+)%", title(page))
    return int(match.group(1)) if match else None


def select_run(page: Any, name: str) -> None:
    poll(lambda: name in page.locator("select").first.inner_text(), 60, f"run {name!r} in the run picker")
    page.locator("select").first.select_option(label=name)
    poll(lambda: title(page).startswith(name + " "), 30, f"run {name!r} selected")


def stored_samples(store: pathlib.Path, name: str) -> list[int]:
    with reader.reading(str(store)) as con:
        run_id = reader.find_run(con, name)
        rel = reader.outputs_relation(con, run_id)
        return [row[0] for row in con.execute(f"SELECT sample_index FROM ({rel.sql_query()})").fetchall()]


@pytest.mark.timeout(240)
def test_live_progress_then_reduced_metrics_errors_and_outputs(
    tmp_path: pathlib.Path, page: Any, serve_dashboard: Any, start_run: Any, docs_dir: pathlib.Path
) -> None:
    store = tmp_path / "ui.duckdb"
    url = serve_dashboard(str(store))  # before the store exists: the page must wait for it
    page.goto(url)
    page.get_by_text("nbbatch dashboard").wait_for()
    poll(lambda: "store not readable" in page.locator(".nbb-stale").inner_text()
         if page.locator(".nbb-stale").count() else False, 30, "the missing-store note")

    proc = start_run(str(store), "live", "--n", "160", "--sleep", "0.2", "--fail-at", "10")
    poll(lambda: status_of(page) == "running", 90, "the run to show as running")
    seen = {percent(page)}
    poll(lambda: seen.add(percent(page)) or len(seen - {None}) >= 2 and status_of(page) == "running", 90,
         f"progress to advance while running (seen {seen})")
    page.get_by_text("Throughput").first.wait_for()
    poll(lambda: status_of(page) == "done", 120, "the run to finish")
    assert proc.wait(timeout=60) == 0, output(proc)

    # 160 samples in 40 batches of 4; the batch holding sample 10 (samples 8..11) fails and is skipped.
    poll(lambda: "100%" in page.locator(".nbb-runs").inner_text(), 30, "the runs table at 100%")
    reduced = page.locator(".nbb-reduced").inner_text()
    assert re.search(r"total\s+" + str(sum(range(160)) - (8 + 9 + 10 + 11)), reduced), reduced
    errors = page.locator(".nbb-errors").inner_text()
    assert "1 error" in errors and "ValueError: cannot process sample 10" in errors
    assert "indices [8, 9, 10, 11]" in errors
    page.locator(".nbb-error summary").first.click()  # unfold the traceback
    assert "Traceback (most recent call last)" in page.locator(".nbb-error pre").first.inner_text()
    assert "line" in page.locator(".nbb-error pre").first.inner_text()

    poll(lambda: "of 156 " in page.locator(".nbb-page").inner_text(), 30, "the outputs page label")
    first_page = page.locator(".nbb-outputs").inner_text()
    page.get_by_role("button", name=re.compile("Next")).click()
    poll(lambda: "rows 21–40 of 156" in page.locator(".nbb-page").inner_text(), 30, "the second outputs page")
    second = page.locator(".nbb-outputs tbody tr").all_inner_texts()
    # sample_index column: rows 21..40 hold samples 24..43, since samples 8..11 were skipped
    assert [row.split("\t")[4] for row in second] == [str(i) for i in range(24, 44)], second[:2]
    assert first_page != page.locator(".nbb-outputs").inner_text()
    assert "slow_run.Slow" in page.locator(".nbb-fingerprint").inner_text()
    assert page.get_by_role("button", name="Stop").is_disabled()
    assert page.get_by_role("button", name="Resume").is_disabled()

    docs_dir.mkdir(exist_ok=True)
    page.screenshot(path=str(docs_dir / "dashboard-run.png"), full_page=True)


@pytest.mark.timeout(300)
def test_stop_preempts_and_resume_finishes_exactly_once(
    tmp_path: pathlib.Path, page: Any, serve_dashboard: Any, start_run: Any, spawn: Any, docs_dir: pathlib.Path
) -> None:
    store = tmp_path / "ui.duckdb"
    url = serve_dashboard(str(store))

    # A run started from Python without launch info: Stop works, Resume explains why not.
    notebook = start_run(str(store), "from-notebook", "--n", "400", "--sleep", "0.2")
    poll(lambda: (summary(store, "from-notebook") or {}).get("status") == "running", 90, "the first run to start")
    page.goto(url)
    select_run(page, "from-notebook")
    poll(lambda: (percent(page) or 0) > 0, 90, "the first run to make progress")
    stop = page.get_by_role("button", name="Stop")
    assert stop.is_enabled()
    stop.click()
    poll(lambda: status_of(page) == "preempted", 120, "the run to stop (preempted)")
    notebook.wait(timeout=60)
    assert page.get_by_role("button", name="Resume").is_disabled()
    note = page.locator(".nbb-resume-note").inner_text()
    assert "defined in a notebook or script" in note and "run_name='from-notebook'" in note
    s = summary(store, "from-notebook")
    assert s is not None and 0 < s["committed_batches"] < 200, s

    # A run the CLI started (launch info recorded): Stop, then Resume runs `nbbatch resume` to the end.
    cli = spawn(cli_run_args(str(store), "from-cli", 240), sleep=0.15)
    poll(lambda: (summary(store, "from-cli") or {}).get("status") == "running", 90, "the second run to start")
    select_run(page, "from-cli")
    poll(lambda: (percent(page) or 0) > 0, 90, "the second run to make progress")
    page.get_by_role("button", name="Stop").click()
    poll(lambda: status_of(page) == "preempted", 120, "the second run to stop")
    assert cli.wait(timeout=60) == 143, output(cli)  # the CLI's exit code for a stopped run
    before = summary(store, "from-cli")
    assert before is not None and before["committed_batches"] < 60, before
    assert str(before["launch"]["target"]).endswith("slow_run.py:Slow"), before["launch"]
    resume = page.get_by_role("button", name="Resume")
    poll(lambda: resume.is_enabled(), 30, "Resume to be enabled")
    docs_dir.mkdir(exist_ok=True)
    page.screenshot(path=str(docs_dir / "dashboard-runs.png"))
    resume.click()
    poll(lambda: "Resuming run 'from-cli'" in page.locator(".nbb-message").inner_text(), 30, "the resume message")
    poll(lambda: (summary(store, "from-cli") or {}).get("status") == "done", 180,
         "the resumed run to finish (see its resume-attempt2.log in the output dir)")
    poll(lambda: status_of(page) == "done", 30, "the page to show done")
    after = summary(store, "from-cli")
    assert after is not None and after["attempt"] == 2
    poll(lambda: not control.resuming(str(after["run_id"])), 60, "the `nbbatch resume` process to exit")
    samples = stored_samples(store, "from-cli")
    assert sorted(samples) == list(range(240)), "every sample_index exactly once after stop + resume"
    assert after["reduced_metrics"] == {"total": sum(range(240))}


N_KILLED = 800  # 200 batches of 4


@pytest.mark.timeout(300)
def test_an_interrupted_run_shows_so_and_its_resume_button_finishes_it(
    tmp_path: pathlib.Path, page: Any, serve_dashboard: Any, spawn: Any
) -> None:
    """`nbbatch run` SIGKILLed (the OOM killer): the page says interrupted, Stop is off, Resume finishes it."""
    store = tmp_path / "ui.duckdb"
    url = serve_dashboard(str(store))
    cli = spawn(cli_run_args(str(store), "oom-killed", N_KILLED), sleep=0.3)  # ~30 s: killed long before the end
    poll(lambda: ((summary(store, "oom-killed") or {}).get("committed_batches") or 0) >= 4, 120, "4 committed batches")
    page.goto(url)
    select_run(page, "oom-killed")
    poll(lambda: status_of(page) == "running", 30, "the run to show as running")
    assert page.get_by_role("button", name="Resume").is_disabled()

    os.kill(cli.pid, signal.SIGKILL)  # the launcher only; its workers go with it
    cli.wait(timeout=30)
    poll(lambda: status_of(page) == "interrupted", 10, "the page to show interrupted")
    before = summary(store, "oom-killed")
    assert before is not None and before["status"] == "interrupted" and before["committed_batches"] < 200, before
    row = page.locator(f".nbb-run-{before['run_id']}").inner_text()
    assert re.search(r"oom-killed\s+interrupted", row), row  # the runs table too
    assert page.get_by_role("button", name="Stop").is_disabled()  # nobody is left to read a stop request

    resume = page.get_by_role("button", name="Resume")
    poll(lambda: resume.is_enabled(), 10, "Resume to be enabled")
    resume.click()
    poll(lambda: "Resuming run 'oom-killed'" in page.locator(".nbb-message").inner_text(), 30, "the resume message")
    poll(lambda: (summary(store, "oom-killed") or {}).get("status") == "done", 180,
         "the resumed run to finish (see resume-attempt2.log in its output dir)")
    poll(lambda: status_of(page) == "done", 30, "the page to show done")
    after = summary(store, "oom-killed")
    assert after is not None and after["attempt"] == 2
    poll(lambda: not control.resuming(str(after["run_id"])), 60, "the `nbbatch resume` process to exit")
    assert sorted(stored_samples(store, "oom-killed")) == list(range(N_KILLED)), "every sample_index exactly once"
    assert after["reduced_metrics"] == {"total": sum(range(N_KILLED))}
