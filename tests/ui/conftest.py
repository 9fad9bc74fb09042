"""Fixtures for the dashboard's browser tests: Debian's Chromium through Playwright, a served dashboard.

Playwright never downloads a browser here: it drives ``/usr/bin/chromium`` (``make browser``
installs it). Without it every test in this folder skips and says why.
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import helpers
import pytest
from helpers import free_port  # noqa: F401 - the UI tests import it from here

CHROMIUM = os.environ.get("NBBATCH_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"
SLOW_RUN = SCRIPTS / "slow_run.py"
POLL_EVERY = 0.2  # seconds between checks: each one is a round trip to the browser or the server

poll = functools.partial(helpers.poll, every=POLL_EVERY)


def _missing() -> str | None:
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        return f"no Chromium at {CHROMIUM} (`make browser` or `apt-get install chromium` installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        return f"playwright is not installed ({exc}); `pip install -e '.[dev]'`"
    return None


@pytest.fixture(autouse=True)
def _kill_servers() -> Iterator[None]:
    """Stop every Panel server a test started; a left-over server thread keeps pytest from exiting."""
    yield
    import panel as pn

    pn.state.kill_all_servers()


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(30_000)
    try:
        yield pg
    finally:
        context.close()


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200 (AssertionError after ``timeout``); a ``?token=`` URL sets its
    cookie, which the redirect needs."""
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())

    def answers() -> bool:
        try:
            with opener.open(url, timeout=5) as response:
                return bool(response.status == 200)
        except urllib.error.HTTPError as exc:  # an answer, not 200: close it, or its socket warns when collected
            exc.close()
            return False
        except OSError:
            return False

    poll(answers, timeout, f"the dashboard at {url} to answer")


@pytest.fixture
def serve_dashboard() -> Callable[[str], str]:
    """Serve the dashboard of a store in this process (threaded, free port); returns its URL with the token."""

    def start(store: str) -> str:
        from nbbatch._ui.dashboard import serve

        server = serve(store, port=0, threaded=True)
        url = str(server.url)
        wait_http(url)
        return url

    return start


def cli_run_args(store: str, name: str, n: int, *extra: str) -> list[str]:
    """``python -m nbbatch run slow_run.py:Slow --dataset slow_run.py:numbers ...``: a run with launch info."""
    return [sys.executable, "-m", "nbbatch", "run", f"{SLOW_RUN}:Slow", "--dataset", f"{SLOW_RUN}:numbers",
            "--dataset-arg", f"n={n}", "--batch-size", "4", "--checkpoint-interval", "2", "--processes", "2",
            "--on-error", "skip", "--max-failures", "5", "--name", name, "--store", store, "--no-progress", *extra]


def printed_url(proc: subprocess.Popen[str], timeout: float = 90.0) -> str:
    """The dashboard URL (with its token) that ``nbbatch dashboard`` or ``run --dashboard`` printed."""
    import re

    def find() -> str | None:
        match = re.search(r"dashboard (?:for \S+ )?at (http://\S+)", output(proc))
        return match.group(1) if match else None

    return str(poll(find, timeout, "the dashboard URL in the output"))


@pytest.fixture
def spawn(tmp_path: pathlib.Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start a command in a subprocess (output to a log in tmp_path); every one still running is killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(args: list[str], sleep: float = 0.1, gate: pathlib.Path | None = None) -> subprocess.Popen[str]:
        log_path = tmp_path / f"proc{len(procs)}.log"
        env = {**os.environ, "NBBATCH_UI_SLEEP": str(sleep), "PYTHONUNBUFFERED": "1"}
        if gate is not None:  # batches after the first wait until the test creates this file
            env["NBBATCH_UI_GATE"] = str(gate)
        with open(log_path, "w") as log:  # a file, not a pipe: a full pipe would stall the run
            proc = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True, env=env,
                                    start_new_session=True)
        proc.log_path = str(log_path)  # type: ignore[attr-defined]
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers
        proc.wait(timeout=30)


def output(proc: subprocess.Popen[str]) -> str:
    return pathlib.Path(proc.log_path).read_text()  # type: ignore[attr-defined]


@pytest.fixture
def start_run(spawn: Callable[..., subprocess.Popen[str]]) -> Callable[..., subprocess.Popen[str]]:
    """Start `scripts/slow_run.py STORE NAME ARGS` (a run without launch info) in a subprocess."""

    def start(store: str, name: str, *args: str) -> subprocess.Popen[str]:
        return spawn([sys.executable, str(SLOW_RUN), store, name, *args])

    return start


@pytest.fixture(scope="session")
def docs_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Where screenshots go: ``docs/`` with ``NBBATCH_UPDATE_SCREENSHOTS=1``, else a temporary folder.

    A plain test run must leave the checkout as it found it.
    """
    if os.environ.get("NBBATCH_UPDATE_SCREENSHOTS") == "1":
        return pathlib.Path(__file__).resolve().parents[2] / "docs"
    return tmp_path_factory.mktemp("screenshots")


def has_chromium() -> bool:
    return _missing() is None and shutil.which(CHROMIUM) is not None
