"""The ipywidgets display, driven by hand-made snapshots and a fake clock (no kernel, no run)."""

from __future__ import annotations

from typing import Any

import pytest

from nbbatch import WorkerFailed
from nbbatch._events import Status
from nbbatch._progress import STATUS_COLORS, PlainReporter, ProgressSnapshot, WorkerProgress
from nbbatch._ui.widgets import WidgetReporter, summary_html, widget_reporter

pytestmark = pytest.mark.timeout(60)


class Handle:
    """Stands in for IPython's DisplayHandle."""

    def __init__(self, obj: Any) -> None:
        self.shown = [obj]

    def update(self, obj: Any) -> None:
        self.shown.append(obj)


class Display:
    def __init__(self) -> None:
        self.handles: list[Handle] = []

    def __call__(self, obj: Any, display_id: bool = False) -> Handle:
        assert display_id is True
        self.handles.append(Handle(obj))
        return self.handles[-1]


def snap(done: int, status: str = "running", errors: tuple[str, ...] = (), **kw: Any) -> ProgressSnapshot:
    fields: dict[str, Any] = {
        "run_name": "demo <run>", "run_id": "r1", "status": status, "total_batches": 10, "done_batches": done,
        "committed_batches": done // 2 * 2, "failed_batches": len(errors), "rows": done * 8, "elapsed": 4.0,
        "rate": 16.0, "eta": (10 - done) * 0.5,
        "workers": (WorkerProgress(0, done // 2, 5, 0, status), WorkerProgress(1, done - done // 2, 5, len(errors), status)),
        "metrics": {"loss": 0.123456, "<tag>": "x"}, "errors": errors,
    }
    fields.update(kw)
    return ProgressSnapshot(**fields)


@pytest.fixture
def clock() -> list[float]:
    return [0.0]


def make(clock: list[float], lookup: Any = None) -> tuple[WidgetReporter, Display]:
    display = Display()
    reporter = WidgetReporter(tracebacks=lookup, clock=lambda: clock[0], display=display)
    return reporter, display


def test_one_display_updated_in_place_at_most_twice_a_second(clock: list[float]) -> None:
    reporter, display = make(clock)
    for step in range(20):  # 20 updates over 2 s
        clock[0] = step * 0.1
        reporter.update(snap(min(step // 2, 10)))
    assert len(display.handles) == 1 and display.handles[0].shown == [reporter.box]
    assert 3 <= reporter.renders <= 5


def test_overall_and_per_worker_bars(clock: list[float]) -> None:
    reporter, _ = make(clock)
    reporter.update(snap(4))
    assert reporter.bar.value == pytest.approx(0.4)
    label = reporter.label.value
    assert "4/10 batches (40%)" in label and "16.0 samples/s" in label and "ETA 3s" in label
    assert "4 committed" in label and "0 failed" in label
    rows = [box.children for box in reporter.workers.children]
    assert [bar.value for bar, _ in rows] == [pytest.approx(0.4), pytest.approx(0.4)]
    assert "rank 1: 2/5 running" in rows[1][1].value
    assert "demo &lt;run&gt;" in reporter.title.value and "<run>" not in reporter.title.value
    assert "loss" in reporter.metrics.value and "0.1235" in reporter.metrics.value
    assert "&lt;tag&gt;" in reporter.metrics.value


def test_errors_show_the_remote_traceback_from_the_store(clock: list[float]) -> None:
    calls: list[str] = []

    def lookup(run_id: str) -> list[tuple[str, str]]:
        calls.append(run_id)
        return [("rank 1, batch_idx 3 (samples 24–31): ValueError: bad <row>", "Traceback ...\nValueError: bad <row>")]

    reporter, _ = make(clock, lookup)
    reporter.update(snap(4, errors=("rank 1, batch_idx 3: ValueError: bad <row>",)))
    assert calls == ["r1"]
    assert "<details>" in reporter.errors.value and "Traceback ...\nValueError: bad &lt;row&gt;" in reporter.errors.value
    # The failing worker's bar takes the failed colour of the one status palette (the dashboard's too).
    assert reporter.workers.children[1].children[0].style.bar_color == STATUS_COLORS[Status.FAILED]
    clock[0] = 1.0
    reporter.update(snap(5, errors=("rank 1, batch_idx 3: ValueError: bad <row>",)))
    assert calls == ["r1"], "the store is read again only when errors change"


def test_close_leaves_static_html_and_closes_the_widgets(clock: list[float]) -> None:
    reporter, display = make(clock)
    reporter.update(snap(4))
    reporter.close(snap(10, status="done", eta=0.0))
    handle = display.handles[0]
    assert len(handle.shown) == 2
    final = handle.shown[1]._repr_html_()
    assert "done" in final and "10/10 batches (100%)" in final and "demo &lt;run&gt;" in final
    assert "rank 0: 5/5 done" in final and "loss" in final
    assert reporter.box.comm is None  # closed: nothing live left in the saved notebook


def test_error_after_close_is_added_to_the_summary(clock: list[float]) -> None:
    reporter, display = make(clock)
    reporter.update(snap(2))
    reporter.close(snap(3, status="failed"))
    reporter.show_error(WorkerFailed("worker 1 raised in batch_idx 1", rank=1, remote_traceback="Traceback\nKeyError: 'k'"))
    final = display.handles[0].shown[-1]._repr_html_()
    assert "failed" in final and "the run raised" in final and "KeyError: &#x27;k&#x27;" in final


def test_error_before_any_update_replaces_the_display(clock: list[float]) -> None:
    reporter, display = make(clock)
    reporter.show_error(RuntimeError("store busy"))
    final = display.handles[0].shown[-1]._repr_html_()
    assert "failed to start" in final and "RuntimeError: store busy" in final


def test_summary_html_escapes_everything() -> None:
    page = summary_html(snap(10, status="done"), [("<h1>", "<script>alert(1)</script>")], "<img src=x>")
    assert "<script>" not in page and "<img" not in page and "<h1>" not in page
    assert "&lt;script&gt;" in page


def test_without_a_kernel_the_reporter_is_text() -> None:
    assert isinstance(widget_reporter(), PlainReporter)


def test_close_from_a_background_thread_keeps_the_widget_with_the_summary(clock: list[float]) -> None:
    import threading

    reporter, display = make(clock)
    reporter.update(snap(4))
    worker = threading.Thread(target=reporter.close, args=(snap(10, status="done"),))
    worker.start()
    worker.join(10)
    assert reporter.box.comm is not None and len(reporter.box.children) == 1
    assert "nbbatch-summary" in reporter.box.children[0].value and "done" in reporter.box.children[0].value
    assert "nbbatch-summary" in display.handles[0].shown[-1]._repr_html_()  # where the frontend routes it


def test_colours_come_from_the_one_status_palette(clock: list[float]) -> None:
    from nbbatch._ui.dashboard.views import status_badge

    reporter, _ = make(clock)
    for status in Status:
        reporter._render(snap(4, status=status.value))
        color = STATUS_COLORS[status]
        assert reporter.bar.style.bar_color == color and f"color:{color}" in reporter.title.value
        assert f"color:{color}" in summary_html(snap(4, status=status.value))
        assert f"background:{color}" in status_badge(status), "the dashboard's badge has the widget's colour"


def test_failed_batches_count_as_processed_everywhere(clock: list[float]) -> None:
    # 7 done and 3 failed (skipped) of 10: the run is through its plan, so every display says 100%.
    final = snap(7, status="done", errors=("a", "b", "c"), workers=(WorkerProgress(0, 7, 10, 3, "done"),))
    assert final.fraction == 1.0 and final.status is Status.DONE
    reporter, display = make(clock)
    reporter.close(final)
    shown = display.handles[0].shown[-1]._repr_html_()
    assert "10/10 batches (100%)" in shown and "rank 0: 10/10 (3 failed) done" in shown
