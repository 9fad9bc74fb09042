"""What the front ends share (issue 10): one fraction done, one status palette, one Jupyter check,
the `Run` handle's background attachment, and the dashboard's typed message state."""

from __future__ import annotations

import io
import pathlib
import threading
from typing import Any

import pytest

from nbbatch import TorchBatchProcessor, torch_batch_process
from nbbatch._events import Status
from nbbatch._progress import (
    OTHER_COLOR,
    STATUS_COLORS,
    PlainReporter,
    ProgressSnapshot,
    TqdmReporter,
    fraction_done,
    in_jupyter,
    status_color,
)
from nbbatch._run import Run, batch_counts

pytestmark = pytest.mark.timeout(120)


def snap(done: int, failed: int, total: int = 10, status: str = "running") -> ProgressSnapshot:
    return ProgressSnapshot(run_name="r", run_id="id", status=status, total_batches=total, done_batches=done,
                            committed_batches=done, failed_batches=failed, rows=done, elapsed=1.0, rate=None, eta=None)


@pytest.mark.parametrize("done,failed,total,expected", [
    (0, 0, 8, 0.0), (3, 1, 8, 0.5), (7, 1, 8, 1.0), (0, 0, 0, 1.0), (9, 3, 8, 1.0),
])
def test_fraction_done_counts_failed_batches_as_processed(done: int, failed: int, total: int, expected: float) -> None:
    assert fraction_done(done, failed, total) == expected
    assert snap(done, failed, total).fraction == expected


def test_a_snapshot_status_is_typed_whatever_the_caller_passed() -> None:
    assert snap(1, 0, status="preempted").status is Status.PREEMPTED
    with pytest.raises(ValueError):
        snap(1, 0, status="no such status")


def test_every_status_has_one_colour_and_unknown_ones_are_grey() -> None:
    assert set(STATUS_COLORS) == set(Status)
    assert len(set(STATUS_COLORS.values())) == len(Status), "two statuses would look alike"
    assert status_color("failed") == status_color(Status.FAILED) == STATUS_COLORS[Status.FAILED]
    assert status_color("starting") == OTHER_COLOR


def test_terminal_displays_count_skipped_batches_like_the_widget() -> None:
    stream = io.StringIO()
    PlainReporter(stream=stream).close(snap(7, 3, status="done"))
    assert "done 10/10 batches (100%)" in stream.getvalue() and "failed 3" in stream.getvalue()
    bar = TqdmReporter(file=io.StringIO())
    bar.update(snap(4, 1))
    assert bar.bar.n == 5
    bar.close(snap(7, 3, status="done"))


def test_no_jupyter_outside_a_kernel() -> None:
    assert in_jupyter() is False  # pytest: maybe IPython imported, never a ZMQ shell
    from IPython import get_ipython
    from IPython.core.interactiveshell import InteractiveShell

    InteractiveShell.instance()  # as the magic's tests do
    assert get_ipython() is not None and in_jupyter() is False, "a plain IPython shell is not Jupyter"


def test_batch_counts_reads_a_summary_once_for_run_and_dashboard() -> None:
    row = {"real_batches": 10, "done_at_start": 4, "live_batches": 3, "committed_batches": 5, "live_failed": 2,
           "committed_rows": 20, "errors": 2}
    assert batch_counts(row) == {"total_batches": 10, "done_batches": 7, "committed_batches": 5, "failed_batches": 2,
                                 "rows": 20, "errors": 2}
    assert batch_counts({**row, "live_batches": 0, "done_at_start": None})["done_batches"] == 5, "commits lead"


def test_attach_background_makes_wait_join_and_raise(tmp_path: pathlib.Path) -> None:
    run = Run(str(tmp_path / "s.duckdb"), "not-read")
    release = threading.Event()
    failures: list[BaseException] = []

    def launcher() -> None:
        release.wait(30)
        failures.append(RuntimeError("worker 0 raised"))

    thread = threading.Thread(target=launcher, daemon=True)
    thread.start()
    run.attach_background(thread, failures)
    assert run.running_in_background
    release.set()
    with pytest.raises(RuntimeError, match="worker 0 raised"):
        run.wait(timeout=30)
    assert not run.running_in_background


class FailsOnSeven(TorchBatchProcessor):
    """Fails the batch holding sample 7 (skipped with ``on_error="skip"``, fatal otherwise)."""

    def __init__(self, context: Any) -> None:
        pass

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        if any(int(v) == 7 for v in batch):
            raise ValueError("seven")
        return {"value": batch}


def test_run_views_show_the_shared_fraction_and_colour(tmp_path: pathlib.Path) -> None:
    run = torch_batch_process(FailsOnSeven, list(range(20)), batch_size=2, num_processes=1, on_error="skip",
                              store=str(tmp_path / "s.duckdb"), run_name="sevens", progress=False)
    assert run.status is Status.DONE and run.counts["failed_batches"] == 1 and run.counts["done_batches"] == 9
    assert run.fraction_done == 1.0, "a done run with a skipped batch is through its plan"
    assert "100% done, 9/10 batches committed, 18 rows, 1 errors" in repr(run)
    page = run._repr_html_()
    assert "100% done" in page and f"color:{STATUS_COLORS[Status.DONE]}" in page
    assert "9/10 committed" in page and "1 failed batches" in page and "first outputs" in page


def test_dashboard_message_is_typed_state_not_read_back_from_its_html(tmp_path: pathlib.Path) -> None:
    from nbbatch import WorkerFailed
    from nbbatch._ui.dashboard.app import Dashboard, Note

    store = str(tmp_path / "s.duckdb")
    name = "nbb-resume-started"  # a legal run name that spells the CSS class the old code searched for
    with pytest.raises(WorkerFailed):
        torch_batch_process(FailsOnSeven, list(range(20)), batch_size=2, num_processes=1, store=store,
                            run_name=name, progress=False)
    board = Dashboard(store)
    board.refresh()
    assert board.detail is not None and board.detail["status"] is Status.FAILED
    assert board.note is Note.RESUME_BLOCKED, "a notebook-defined run cannot resume from the dashboard"
    assert "nbb-resume-note" in board.message.object and "defined in a notebook or script" in board.message.object
    board._say(Note.RESUMING, f"Resuming run {name!r}")
    board.refresh()
    assert board.note is Note.RESUMING, "the resume message stays until the next action"
    board._say(None)
    board.refresh()
    assert board.note is Note.RESUME_BLOCKED
    assert board.stop_button.disabled and board.resume_button.disabled


def test_dashboard_title_counts_skipped_batches_like_the_widget() -> None:
    from nbbatch._ui.dashboard.views import run_title_html

    detail = {"name": "<r>", "status": Status.DONE, "real_batches": 10, "done_at_start": 0, "live_batches": 7,
              "committed_batches": 7, "live_failed": 3, "committed_rows": 14, "errors": 3}
    title = run_title_html(detail)
    assert "100% · 10/10 batches · 14 rows stored" in title and "&lt;r&gt;" in title
    assert f"background:{STATUS_COLORS[Status.DONE]}" in title
