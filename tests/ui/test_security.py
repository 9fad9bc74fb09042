"""The served dashboard as an attacker meets it: the Host allow-list, the token, Stop/Resume rights, page size.

Hostile inputs, each against a real server: a rebinding ``Host``/``Origin`` (``evil.example:PORT``)
over HTTP, over the websocket and from Chromium resolving ``evil.example`` to 127.0.0.1; no
token or a wrong one; a browser session without control rights that forces the disabled Stop
button; and a run whose outputs are 2 MB strings, whose page must stay small.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import pathlib
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import ARGS, CHROMIUM, SCRIPTS, SLOW_RUN, free_port, output, poll, wait_http

from nbbatch._store import reader
from nbbatch._store.control import stop_file
from nbbatch._ui.dashboard import control, serve, views
from nbbatch._ui.dashboard.app import Dashboard
from nbbatch._ui.dashboard.auth import Access, Rights

ROOT = pathlib.Path(__file__).resolve().parents[2]
EVIL = "evil.example"


def _make_store(tmp: pathlib.Path, script: pathlib.Path, name: str, *args: str) -> pathlib.Path:
    store = tmp / f"{name}.duckdb"
    done = subprocess.run([sys.executable, str(script), str(store), name, *args], cwd=tmp, capture_output=True,
                          text=True, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return store


@pytest.fixture(scope="module")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One finished run, "small" (24 samples)."""
    return _make_store(tmp_path_factory.mktemp("sec"), SLOW_RUN, "small", "--n", "24", "--sleep", "0")


@pytest.fixture(scope="module")
def big_store(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """One run, "big": 24 outputs of 2,000,000+ characters and a skipped batch with a 2 MB message."""
    return _make_store(tmp_path_factory.mktemp("big"), SCRIPTS / "big_strings.py", "big")


@pytest.fixture
def served(small_store: pathlib.Path) -> Iterator[Any]:
    server = serve(str(small_store), port=0, threaded=True)
    wait_http(server.url)
    yield server


def _lan_address() -> str | None:
    """This machine's address on its default route (a UDP connect sends nothing), or None."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.254", 9))
        except OSError:
            return None
        address = str(s.getsockname()[0])
    return None if address.startswith("127.") else address


# -- the policy itself ------------------------------------------------------------------------------

def test_host_allow_list() -> None:
    local = Access.make("127.0.0.1", "t")
    for host in ("127.0.0.1:5006", "localhost:5006", "[::1]:5006", "LOCALHOST.", "127.0.0.2:80"):
        assert local.host_allowed(host), host
    for host in (f"{EVIL}:5006", EVIL, "192.0.2.2:5006", "", "localhost.evil.example", "[::1"):
        assert not local.host_allowed(host), host
    everywhere = Access.make("0.0.0.0", "t", allow_hosts=["proxy.example"])
    assert everywhere.host_allowed("192.0.2.2:5006") and everywhere.host_allowed("[fd00::2]:5006")
    assert everywhere.host_allowed(f"{socket.gethostname()}:5006") and everywhere.host_allowed("proxy.example")
    assert not everywhere.host_allowed(f"{EVIL}:5006")
    assert Access.make("127.0.0.1", "t", allow_hosts=["*"]).host_allowed(EVIL)


def test_session_rights() -> None:
    gated = Access.make("127.0.0.1", "secret")
    host = {"Host": "127.0.0.1:5006"}
    assert gated.session_rights(host, {gated.cookie: "secret"}, {}, None) == Rights(True, True)
    assert gated.session_rights(host, {}, {"token": [b"secret"]}, None) == Rights(True, True)
    assert not gated.session_rights(host, {gated.cookie: "wrong"}, {"token": [b"nope"]}, None).view
    assert not gated.session_rights({"Host": f"{EVIL}:5006"}, {gated.cookie: "secret"}, {}, None).view
    signed_in = Access.make("127.0.0.1", None)  # Panel's basic auth or OAuth
    assert signed_in.session_rights(host, {}, {}, "alice") == Rights(True, True)
    read_only = signed_in.session_rights(host, {}, {}, None)
    assert read_only.view and not read_only.control and "token" in read_only.reason


# -- HTTP and websocket, as a script or an attacker's page would send them --------------------------

def test_http_needs_the_token_and_an_allowed_host(served: Any) -> None:
    base = f"http://127.0.0.1:{served.port}"
    token = served.access.token
    refused = {
        "no token": requests.get(base + "/", allow_redirects=False),
        "wrong token": requests.get(base + "/?token=" + "0" * 48, allow_redirects=False),
        "static file": requests.get(base + "/static/js/bokeh.min.js", allow_redirects=False),
        "full value": requests.get(base + "/nbbatch/value?run=x&field=error", allow_redirects=False),
        "rebinding Host": requests.get(base + "/?token=" + token, allow_redirects=False,
                                       headers={"Host": f"{EVIL}:{served.port}", "Origin": f"http://{EVIL}:{served.port}"}),
        "rebinding Host, token header": requests.get(base + "/", headers={"Host": f"{EVIL}:{served.port}",
                                                                           "Authorization": f"token {token}"}),
        "foreign Origin": requests.get(base + "/", headers={"Origin": f"http://{EVIL}:{served.port}",
                                                            "Authorization": f"token {token}"}),
    }
    assert {what: r.status_code for what, r in refused.items()} == {what: 403 for what in refused}
    assert EVIL in refused["rebinding Host"].text and "--allow-host" in refused["rebinding Host"].text
    assert "token" in refused["no token"].text and "bokeh" not in refused["no token"].text.lower()

    with requests.Session() as browser:  # closed here: an open pool would warn in whichever test GC runs
        first = browser.get(served.url, allow_redirects=False)
        assert first.status_code == 302 and first.headers["Location"] == "/"  # the token leaves the address bar
        assert "HttpOnly" in first.headers["Set-Cookie"] and "SameSite=Lax" in first.headers["Set-Cookie"]
        page = browser.get(base + "/")
        assert page.status_code == 200 and "nbbatch" in page.text
        assert requests.get(base + "/", headers={"Authorization": f"token {token}"}).status_code == 200
        assert requests.get(f"http://127.0.0.1:{served.port}//{EVIL}/?token={token}",
                            allow_redirects=False).headers["Location"] == f"/{EVIL}/"  # never an open redirect


def test_stopping_the_server_closes_connections_still_open(served: Any) -> None:
    """A browser's keep-alive connection is closed by the server's stop, not left to the garbage collector
    (which warned about the unclosed socket in whichever later test it ran)."""
    client = http.client.HTTPConnection("127.0.0.1", served.port, timeout=10)
    try:
        client.request("GET", "/?token=" + served.access.token)
        assert client.getresponse().read() is not None  # answered; the connection stays open (HTTP/1.1)
        served.stop()
        served.join(10)
        assert not served.is_alive()
        assert client.sock is not None and client.sock.recv(1) == b"", "the server closed its end"
    finally:
        client.close()


def _ws_status(port: int, headers: dict[str, str]) -> int:
    """The HTTP status a websocket handshake to the dashboard gets (101 when it opens)."""
    from bokeh.util.token import generate_jwt_token, generate_session_id
    from tornado.httpclient import HTTPClientError, HTTPRequest
    from tornado.websocket import websocket_connect

    async def connect() -> int:
        request = HTTPRequest(f"ws://127.0.0.1:{port}/ws", headers=headers, request_timeout=20)
        session = generate_jwt_token(generate_session_id())  # what Bokeh's page sends as its subprotocol
        try:
            conn = await websocket_connect(request, subprotocols=["bokeh", session])
        except HTTPClientError as exc:
            return exc.code
        await asyncio.wait_for(conn.read_message(), 20)  # Bokeh's ACK: a live session
        conn.close()
        await asyncio.wait_for(conn.read_message(), 20)  # None once the close completes
        return 101

    # A thread of its own: in the full suite Playwright's sync API keeps an event loop running on this one.
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(asyncio.run(connect())), name="ws-handshake")
    worker.start()
    worker.join(60)
    assert result, "the websocket handshake did not finish within 60 s"
    return result[0]


def test_websocket_refuses_rebinding_and_missing_token(served: Any) -> None:
    port, token = served.port, served.access.token
    cookie = f"{served.access.cookie}={token}"
    assert _ws_status(port, {"Host": f"{EVIL}:{port}", "Origin": f"http://{EVIL}:{port}", "Cookie": cookie}) == 403
    assert _ws_status(port, {"Origin": f"http://{EVIL}:{port}", "Cookie": cookie}) == 403
    assert _ws_status(port, {"Origin": f"http://127.0.0.1:{port}"}) == 403  # no token
    assert _ws_status(port, {"Origin": f"http://127.0.0.1:{port}", "Cookie": cookie}) == 101  # the gate lets it by


# -- Chromium ----------------------------------------------------------------------------------------

def _runs(page: Any) -> str:
    loc = page.locator(".nbb-runs")
    return loc.inner_text() if loc.count() else ""


@pytest.mark.ui
@pytest.mark.timeout(180)
def test_token_url_works_from_the_served_address(small_store: pathlib.Path, browser: Any) -> None:
    address = _lan_address()
    if address is None:
        pytest.skip("this machine has no non-loopback address to serve on")
    server = serve(str(small_store), port=0, address="0.0.0.0", threaded=True)
    remote = f"http://{address}:{server.port}/"
    wait_http(server.url)
    context = browser.new_context()
    try:
        page = context.new_page()
        assert page.goto(remote + "?token=" + server.access.token).status == 200
        poll(lambda: "small" in _runs(page) and "done" in _runs(page), 60, "the runs table over the websocket")
        assert page.url == remote  # the token was traded for a cookie
        again = context.new_page()
        assert again.goto(remote).status == 200  # the cookie alone now
        poll(lambda: "small" in _runs(again), 60, "the runs table on a second visit without the token")
    finally:
        context.close()
    stranger = browser.new_context()
    try:
        response = stranger.new_page().goto(remote)
        assert response.status == 403 and "token" in response.text()
    finally:
        stranger.close()


@pytest.mark.ui
@pytest.mark.timeout(120)
def test_chromium_on_a_rebound_name_is_refused(served: Any, browser: Any) -> None:
    """Chromium resolves evil.example to 127.0.0.1, as after DNS rebinding: even with the token, 403."""
    chromium = browser.browser_type.launch(executable_path=CHROMIUM, headless=True,
                                           args=[*ARGS, f"--host-resolver-rules=MAP {EVIL} 127.0.0.1"])
    try:
        page = chromium.new_page()
        response = page.goto(f"http://{EVIL}:{served.port}/?token={served.access.token}")
        assert response.status == 403 and "DNS rebinding" in response.text()
        assert page.goto(f"http://127.0.0.1:{served.port}/?token={served.access.token}").status == 200
    finally:
        chromium.close()


@pytest.mark.ui
@pytest.mark.timeout(240)
def test_stop_from_a_session_without_control_does_nothing(tmp_path: pathlib.Path, page: Any, spawn: Any,
                                                          start_run: Any) -> None:
    """``panel serve dashboard/app.py`` without a token is read-only; forcing Stop in the browser is refused."""
    store = tmp_path / "ro.duckdb"
    port = free_port()
    server = spawn([sys.executable, "-m", "panel", "serve", str(ROOT / "dashboard" / "app.py"), "--port", str(port),
                    "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}",
                    "--args", "--store", str(store)])
    run = start_run(str(store), "live", "--n", "200", "--sleep", "0.1")
    wait_http(f"http://127.0.0.1:{port}/app", timeout=90)
    page.goto(f"http://127.0.0.1:{port}/app")
    title = page.locator(".nbb-title")
    poll(lambda: title.count() and "running" in title.inner_text(), 90, f"the run to show as running: {output(server)}")
    assert "read-only" in page.locator(".nbb-readonly").inner_text()
    stop = page.locator(".nbb-stop button")
    assert stop.is_disabled()
    stop.evaluate("button => { button.disabled = false; }")  # what a hostile client can always do
    stop.click()
    poll(lambda: page.locator(".nbb-refused").count(), 30, "the refusal message")
    assert "token" in page.locator(".nbb-refused").inner_text()
    assert run.wait(timeout=120) == 0, output(run)
    with reader.reading(str(store)) as con:
        assert reader.run_summary(con, "live")["status"] == "done"  # never preempted


@pytest.mark.ui
@pytest.mark.timeout(180)
def test_panel_serve_with_a_token(small_store: pathlib.Path, page: Any, spawn: Any) -> None:
    """``panel serve dashboard/app.py --args --token T``: no page without ``?token=T``; with it, full control."""
    port = free_port()
    server = spawn([sys.executable, "-m", "panel", "serve", str(ROOT / "dashboard" / "app.py"), "--port", str(port),
                    "--address", "127.0.0.1", "--allow-websocket-origin", f"127.0.0.1:{port}",
                    "--args", "--store", str(small_store), "--token", "t0ken-for-panel-serve"])
    url = f"http://127.0.0.1:{port}/app"
    wait_http(url, timeout=90)
    page.goto(url)
    poll(lambda: page.locator(".nbb-refused").count(), 60, "the refusal")
    refusal = page.locator(".nbb-refused").inner_text()
    assert "token" in refusal and not page.locator(".nbb-runs").count(), refusal
    page.goto(url + "?token=t0ken-for-panel-serve")
    try:
        poll(lambda: "small" in _runs(page), 60, "the runs table with the token")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; page: {page.locator('body').inner_text()[:500]!r}; "
                             f"server: {output(server)[-2000:]}") from None
    assert not page.locator(".nbb-readonly").count(), page.locator(".nbb-readonly").inner_text()


def test_resume_from_a_session_without_control_starts_nothing(small_store: pathlib.Path) -> None:
    board = Dashboard(str(small_store), rights=Rights(True, False, "needs the token"))
    board.detail = {"run_id": "f" * 32, "name": "small", "status": "preempted", "attempt": 1,
                    "launch": {"target": "m:Cls", "dataset": "m:make", "cwd": str(small_store.parent)}}
    assert control.can_resume(board.detail)  # resumable: only the session's rights stop it
    board._on_resume(None)
    board.run_id = "f" * 32
    board._on_stop(None)
    assert not control.resuming("f" * 32)
    assert "Refused" in str(board.message.object) and "needs the token" in str(board.message.object)
    assert not os.path.exists(stop_file(str(small_store), "f" * 32))
    assert not list(small_store.parent.rglob("resume-attempt*.log"))


# -- page size ---------------------------------------------------------------------------------------

def test_views_clip_long_values() -> None:
    big = "x" * 2_000_000
    rows = [(i, big + str(i)) for i in range(20)]
    page = views.outputs_html(["sample_index", "text"], rows, value_url="/nbbatch/value?run=r")
    assert len(page) < 120_000, len(page)
    assert "2,000,001 characters" in page and "/nbbatch/value?run=r&amp;column=text&amp;sample=3" in page
    error = {"exc_type": "ValueError", "message": big, "traceback": big, "indices": [1], "fatal": False, "rank": 0,
             "batch_idx": 0, "global_batch": 0, "attempt": 1, "occurred_at": None, "error_id": 7}
    assert len(views.errors_html(50, [error] * 50)) < 1_200_000  # the most one refresh shows: 50 errors
    assert len(views.fingerprint_html({"run_id": "r", "error": big, "config": {"k": big}})) < 60_000
    assert views.clip("short <b>") == "short &lt;b&gt;"


@pytest.mark.ui
@pytest.mark.timeout(300)
def test_two_megabyte_outputs_keep_the_page_small(big_store: pathlib.Path, page: Any) -> None:
    server = serve(str(big_store), port=0, threaded=True)
    wait_http(server.url)
    received: list[int] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda payload: received.append(len(payload))))
    page.goto(server.url)
    rows = page.locator(".nbb-outputs tbody tr")
    poll(lambda: rows.count() == 20, 90, "the first outputs page")
    poll(lambda: "1 error" in page.locator(".nbb-errors").inner_text(), 30, "the error")
    shown = {cls: page.locator(cls).evaluate("el => el.outerHTML.length") for cls in (".nbb-outputs", ".nbb-errors")}
    # In full: 20 outputs of 2 MB (40 MB), a 2 MB message and a 2 MB traceback. Bokeh does not
    # compress its websocket, so these frames are what the browser really received.
    assert sum(received) < 1_500_000, f"{sum(received):,} bytes over the websocket"
    assert shown[".nbb-outputs"] < 150_000 and shown[".nbb-errors"] < 60_000, shown

    cell = page.locator(".nbb-outputs .nbb-long").first
    assert "2,000,003 characters" in cell.inner_text()
    cell.locator("summary").click()
    assert cell.locator("pre").inner_text().startswith("xxxx")
    href = cell.locator("a.nbb-full").get_attribute("href")
    assert href is not None and "column=text" in href
    full = page.request.get(f"http://127.0.0.1:{server.port}{href}")  # the context's cookie, no token
    assert full.status == 200 and full.text() == "x" * 2_000_000 + " #0"
    assert requests.get(f"http://127.0.0.1:{server.port}{href}").status_code == 403

    error = page.locator(".nbb-error").first
    error.locator("summary").first.click()
    assert "characters" in error.inner_text()
    link = error.locator("a.nbb-full").last.get_attribute("href")
    text = page.request.get(f"http://127.0.0.1:{server.port}{link}").text()
    assert "Traceback" in text and text.rstrip().endswith("y" * 100) and len(text) > 2_000_000
    assert re.search(r"field=traceback", str(link))
