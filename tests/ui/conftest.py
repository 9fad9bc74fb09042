"""Fixtures for the dashboard's browser tests: Debian's Chromium through Playwright, a served dashboard.

Playwright never downloads a browser here: it drives ``/usr/bin/chromium`` (``make browser``
installs it). Without it every test in this folder skips and says why.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest

CHROMIUM = os.environ.get("NBBATCH_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"
SLOW_RUN = SCRIPTS / "slow_run.py"


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
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"the dashboard at {url} did not answer within {timeout}s")
        time.sleep(0.2)


@pytest.fixture
def serve_dashboard() -> Callable[[str], str]:
    """Serve the dashboard of a store in this process (threaded, free port); returns its URL."""

    def start(store: str) -> str:
        from nbbatch._ui.dashboard import serve

        server = serve(store, port=0, threaded=True)
        url = f"http://127.0.0.1:{server.port}/"
        wait_http(url)
        return url

    return start


@pytest.fixture
def start_run(tmp_path: pathlib.Path) -> Iterator[Callable[..., subprocess.Popen[str]]]:
    """Start `scripts/slow_run.py` in a subprocess; every one still running is killed at teardown."""
    procs: list[subprocess.Popen[str]] = []

    def start(store: str, name: str, *args: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([sys.executable, str(SLOW_RUN), store, name, *args], cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)


def poll(check: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Call ``check`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="session")
def docs_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2] / "docs"


def has_chromium() -> bool:
    return _missing() is None and shutil.which(CHROMIUM) is not None
