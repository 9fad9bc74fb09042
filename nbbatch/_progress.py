"""Progress numbers (rate, ETA, fraction done), the terminal renderers, and what every display shares.

The launcher builds a `ProgressSnapshot` about once a second and hands it to a `Reporter`: a tqdm
bar in a terminal, plain lines when output is not a TTY, an ipywidgets display in Jupyter
(``nbbatch._ui.widgets``). The clock is passed in. The front ends (widget, dashboard, `Run`'s
notebook view, CLI) take three things from here so they agree: `fraction_done`, `STATUS_COLORS`
and `in_jupyter`. Must not import torch, DuckDB, IPython (at import time) or the launcher.
"""

from __future__ import annotations

import logging
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Protocol, TextIO

from nbbatch._events import Status

__all__ = [
    "OTHER_COLOR",
    "PLAIN_EVERY_SECONDS",
    "RATE_WINDOW_SECONDS",
    "STATUS_COLORS",
    "PlainReporter",
    "ProgressSnapshot",
    "RateMeter",
    "Reporter",
    "TqdmReporter",
    "WorkerProgress",
    "format_duration",
    "fraction_done",
    "in_jupyter",
    "status_color",
]

Clock = Callable[[], float]

#: Seconds of history behind a live rate (items/s), in the launcher's meter and the dashboard alike.
RATE_WINDOW_SECONDS = 15.0
#: Seconds between two lines of `PlainReporter` (logs, CI).
PLAIN_EVERY_SECONDS = 10.0

#: The one colour of each run status, in the widget, the dashboard and `Run`'s notebook view. Dark
#: enough for white badge text (dashboard) and for coloured text on white (widget, `Run`).
STATUS_COLORS: Mapping[Status, str] = MappingProxyType({
    Status.RUNNING: "#1565c0",
    Status.DONE: "#2e7d32",
    Status.FAILED: "#c62828",
    Status.PREEMPTED: "#e65100",
    Status.INTERRUPTED: "#6a1b9a",
})
#: For a status this nbbatch does not know (a worker's ``starting``, a newer store's value).
OTHER_COLOR = "#616161"


def status_color(status: str) -> str:
    """The colour of ``status`` (a `Status` or its string value) in every display.

    Example:
        >>> status_color("done") == STATUS_COLORS[Status.DONE]
        True
    """
    try:
        return STATUS_COLORS[Status(status)]
    except ValueError:
        return OTHER_COLOR


def fraction_done(done: int, failed: int, total: int) -> float:
    """Share of the ``total`` planned batches processed: done ones and failed (skipped) ones.

    A batch that failed under ``on_error="skip"`` is finished for this attempt: nothing more will
    happen to it, so a run that ends ``done`` with skipped batches shows 100%. Every front end
    (widget, dashboard, `Run`, the CLI's bar and lines) uses this one definition.

    Args:
        done: batches processed successfully (committed before this attempt, or processed in it).
        failed: batches that failed and were skipped.
        total: batches planned.

    Returns:
        A number in ``[0, 1]``; 1.0 for an empty plan.

    Example:
        >>> fraction_done(done=3, failed=1, total=8)
        0.5
    """
    if total <= 0:
        return 1.0
    return max(0.0, min(1.0, (done + failed) / total))


def in_jupyter() -> bool:
    """Whether this process is a Jupyter kernel (ipykernel's shell), not a terminal IPython or a script.

    The one check behind every "Jupyter or not" choice: the widget or a terminal bar, loading
    Panel's notebook extension. IPython is imported only if something imported it already.
    """
    if "IPython" not in sys.modules:  # no shell can be running, and `import nbbatch` stays light
        return False
    from IPython import get_ipython

    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


@dataclass(frozen=True)
class WorkerProgress:
    """One worker's counters in the current attempt."""

    rank: int
    done: int
    total: int
    failed: int
    status: str
    """A run `Status` value, or ``starting`` before the worker reported ready."""

    @property
    def fraction(self) -> float:
        """Share of this worker's batches processed (`fraction_done`)."""
        return fraction_done(self.done, self.failed, self.total)


@dataclass(frozen=True)
class ProgressSnapshot:
    """What every progress display shows."""

    run_name: str
    run_id: str
    status: Status
    total_batches: int
    done_batches: int
    committed_batches: int
    failed_batches: int
    rows: int
    elapsed: float
    rate: float | None
    eta: float | None
    workers: tuple[WorkerProgress, ...] = ()
    metrics: dict[str, Any] = field(default_factory=dict)
    errors: tuple[str, ...] = ()
    activity: str = ""
    """What the run waits for, set by the launcher (e.g. ``starting 2 workers``); empty once they run."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", Status(self.status))  # a caller's plain "running" becomes typed

    @property
    def processed_batches(self) -> int:
        """Batches finished in any way: done, or failed and skipped."""
        return self.done_batches + self.failed_batches

    @property
    def fraction(self) -> float:
        """Share of planned batches processed, failed (skipped) ones included (`fraction_done`)."""
        return fraction_done(self.done_batches, self.failed_batches, self.total_batches)


class RateMeter:
    """Items per second over a sliding window, and the ETA of the rest.

    Example:
        >>> t = [0.0]
        >>> m = RateMeter(clock=lambda: t[0], window=10)
        >>> m.add(0); t[0] = 2.0; m.add(100)
        >>> m.rate()
        50.0
    """

    def __init__(self, clock: Clock = time.monotonic, window: float = RATE_WINDOW_SECONDS) -> None:
        self.clock = clock
        self.window = window
        self.samples: deque[tuple[float, float]] = deque()

    def add(self, total_done: float) -> None:
        """Record the cumulative count now."""
        now = self.clock()
        self.samples.append((now, total_done))
        while len(self.samples) > 2 and now - self.samples[1][0] > self.window:
            self.samples.popleft()

    def rate(self) -> float | None:
        """Items per second, or None before two samples over a non-zero interval."""
        if len(self.samples) < 2:
            return None
        (t0, d0), (t1, d1) = self.samples[0], self.samples[-1]
        if t1 <= t0:
            return None
        return (d1 - d0) / (t1 - t0)

    def eta(self, remaining: float) -> float | None:
        """Seconds left for ``remaining`` items at the current rate."""
        rate = self.rate()
        if remaining <= 0:
            return 0.0
        if not rate or rate <= 0:
            return None
        return remaining / rate


def format_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``12s`` or ``?``."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Reporter(Protocol):
    """A progress display."""

    def update(self, snapshot: ProgressSnapshot) -> None:
        """Show the latest numbers (called about once a second)."""
        ...

    def close(self, snapshot: ProgressSnapshot) -> None:
        """Show the final state and release the display."""
        ...


class NullReporter:
    """Shows nothing."""

    def update(self, snapshot: ProgressSnapshot) -> None:
        return None

    def close(self, snapshot: ProgressSnapshot) -> None:
        return None


class TqdmReporter:
    """A tqdm bar over batches, with samples/s and errors in the postfix."""

    def __init__(self, file: TextIO | None = None) -> None:
        self.file = file
        self.bar: Any = None

    def update(self, snapshot: ProgressSnapshot) -> None:
        from tqdm.auto import tqdm

        desc = f"{snapshot.run_name} ({snapshot.activity})" if snapshot.activity else snapshot.run_name
        if self.bar is None:
            self.bar = tqdm(total=snapshot.total_batches, desc=desc, unit="batch", file=self.file,
                            initial=snapshot.processed_batches, dynamic_ncols=True)
        self.bar.set_description(desc, refresh=False)
        self.bar.n = snapshot.processed_batches
        postfix = {"samples/s": f"{snapshot.rate:.0f}" if snapshot.rate else "?"}
        if snapshot.failed_batches:
            postfix["failed"] = str(snapshot.failed_batches)
        self.bar.set_postfix(postfix, refresh=False)
        self.bar.refresh()

    def close(self, snapshot: ProgressSnapshot) -> None:
        self.update(snapshot)
        self.bar.set_description(f"{snapshot.run_name} [{snapshot.status}]")
        self.bar.close()


class PlainReporter:
    """One log line every ``every`` seconds, for logs and CI (stdout is not a TTY)."""

    def __init__(self, every: float = PLAIN_EVERY_SECONDS, clock: Clock = time.monotonic, stream: TextIO | None = None) -> None:
        self.every = every
        self.clock = clock
        self.stream = stream
        self.last: float | None = None

    def _line(self, s: ProgressSnapshot) -> str:
        rate = f"{s.rate:.1f} samples/s" if s.rate else "? samples/s"
        return (
            f"nbbatch {s.run_name}: {s.status} {s.processed_batches}/{s.total_batches} batches "
            f"({100 * s.fraction:.0f}%), {rate}, eta {format_duration(s.eta)}, failed {s.failed_batches}"
            + (f", {s.activity}" if s.activity else "")
        )

    def _write(self, text: str) -> None:
        stream = self.stream or sys.stderr
        stream.write(text + "\n")
        stream.flush()

    def update(self, snapshot: ProgressSnapshot) -> None:
        now = self.clock()
        if self.last is None or now - self.last >= self.every:
            self.last = now
            self._write(self._line(snapshot))

    def close(self, snapshot: ProgressSnapshot) -> None:
        self._write(self._line(snapshot))


def terminal_reporter(stream: TextIO | None = None) -> Reporter:
    """A tqdm bar on a TTY, plain lines otherwise."""
    stream = stream or sys.stderr
    if getattr(stream, "isatty", lambda: False)():
        return TqdmReporter(stream)
    return PlainReporter(stream=stream)


logging.getLogger("nbbatch").addHandler(logging.NullHandler())
