"""The Panel dashboard: inline in a notebook (`dashboard`) or served (`serve`, `nbbatch dashboard`).

Panel loads only when a dashboard is asked for, so ``import nbbatch`` and the CLI stay quick.
Layout and refresh live in ``app``, the SQL in ``queries``, HTML in ``views``, Stop/Resume in
``control``, who may connect in ``auth`` (Host allow-list, token), whole long values in
``values``. Must not import ``_launch``, ``_worker`` or ``_store.writer``.
"""

from __future__ import annotations

import logging
import os
import queue
import uuid
import webbrowser
from collections.abc import Callable
from typing import Any

__all__ = ["GATE_OPTIONS", "PANEL_AUTH_OPTIONS", "REFRESH_MS", "dashboard", "serve"]

REFRESH_MS = 1000
log = logging.getLogger("nbbatch")


def dashboard(store: str | None = None, run: str | None = None, refresh_ms: int = REFRESH_MS) -> Any:
    """The live dashboard of ``store`` as a Panel object; it displays inline in Jupyter.

    It refreshes about once a second while the kernel is idle, reading the store read-only for a
    few milliseconds each time, so a run in another process is never disturbed.

    Args:
        store: the DuckDB store (default: ``$NBBATCH_STORE`` or ``nbbatch.duckdb``).
        run: name or id of the run to show first (default: the newest).
        refresh_ms: milliseconds between refreshes.

    Returns:
        A ``panel.Column``.

    Example:
        >>> import nbbatch
        >>> nbbatch.dashboard("nbbatch.duckdb")    # doctest: +SKIP
    """
    import panel as pn

    from nbbatch._progress import in_jupyter
    from nbbatch._run import default_store
    from nbbatch._ui.dashboard.app import build

    if in_jupyter() and not getattr(pn.extension, "_loaded", False):
        pn.extension()  # loads Panel's JS into the notebook once
    return build(store or default_store(), run=run, period_ms=refresh_ms)


#: Panel's options for signing users in, passed through to `panel.serve` (see its docs).
PANEL_AUTH_OPTIONS = frozenset({
    "basic_auth", "basic_login_template", "cookie_secret", "login_endpoint", "login_template", "logout_endpoint",
    "logout_template", "oauth_encryption_key", "oauth_error_template", "oauth_extra_params",
    "oauth_guest_endpoints", "oauth_jwt_user", "oauth_key", "oauth_optional", "oauth_provider",
    "oauth_redirect_uri", "oauth_refresh_tokens", "oauth_secret",
})
#: `serve`'s own access options; the rest of its ``**gate`` must be `PANEL_AUTH_OPTIONS`.
GATE_OPTIONS = frozenset({"token", "allow_hosts"})
#: Longest `serve(threaded=True)` waits for its server thread to listen, and then to end after a failed start.
START_TIMEOUT_SECONDS = 120.0
JOIN_TIMEOUT_SECONDS = 30.0


def serve(
    store: str, port: int = 0, address: str = "127.0.0.1", show: bool = False, threaded: bool = False, *,
    on_ready: Callable[[str], None] | None = None, **gate: Any,
) -> Any:
    """Serve the dashboard of ``store`` at ``http://ADDRESS:PORT/?token=TOKEN``.

    Only requests whose ``Host`` is a loopback name, ``address`` or one of ``allow_hosts`` are
    answered (DNS rebinding protection), and only with the launch token: in the URL on the first
    visit, then as a cookie. With Panel's ``basic_auth`` or ``oauth_provider`` the token is
    required only if one is given; Panel signs users in instead.

    Args:
        store: the DuckDB store to show (it need not exist yet; the page says so until it does).
        port: TCP port; ``0`` picks a free one (read it back from the returned ``.port``/``.url``).
        address: interface to listen on; ``127.0.0.1`` keeps it on this machine, ``0.0.0.0`` opens it
            to the network (the token is what keeps others out).
        show: open a browser tab.
        threaded: serve from a background thread and return at once (the returned object has
            ``.port``, ``.url`` and ``.stop()``); otherwise block until Ctrl-C.
        on_ready: called with the full URL (real port, token) once the server listens.
        **gate: who may connect: ``token=`` (a string; default ``$NBBATCH_DASHBOARD_TOKEN``, else
            a random one), ``allow_hosts=`` (more host names the browser may use, e.g. a reverse
            proxy's; ``*``: any), and Panel's ``basic_auth``, ``oauth_provider``, ``oauth_key``,
            ``oauth_secret``, ``cookie_secret``... (`PANEL_AUTH_OPTIONS`), passed to `panel.serve`.

    Returns:
        The server thread (``threaded=True``) or the Bokeh server once it stopped.

    Raises:
        InvalidArgument: an option neither nbbatch nor Panel knows, an empty token, or a
            ``token``/``allow_hosts`` of the wrong type.

    Example:
        >>> server = serve("nbbatch.duckdb", port=0, threaded=True)   # doctest: +SKIP
        >>> server.url                                                 # doctest: +SKIP
        'http://127.0.0.1:40123/?token=...'
        >>> server.stop()                                              # doctest: +SKIP
    """
    from nbbatch._ui.dashboard import values
    from nbbatch._ui.dashboard.app import build

    access, panel_auth = _access(address, gate)
    path = os.path.abspath(store)
    options: dict[str, Any] = {
        "port": port, "address": address, "title": "nbbatch", "verbose": False, "show": False, **panel_auth,
        "extra_patterns": [(values.PATH, values.FullValueHandler, {"store": path})],
    }
    panels = {"/": lambda: build(path, access=access, full_links=True)}
    if threaded:
        thread = _serve_in_thread(panels, access, options)
        _ready(path, thread.url, on_ready, webbrowser.open if show else None)
        return thread
    server = _prepare(panels, access, options)

    def open_tab(url: str) -> None:  # once the loop runs, so the page finds a server
        server.io_loop.add_callback(webbrowser.open, url)

    _ready(path, access.url(server.port), on_ready, open_tab if show else None)
    server.start()
    try:
        server.io_loop.start()  # until Ctrl-C (Panel's SIGINT handler stops the loop)
    except RuntimeError:  # the loop was already running (an embedding application owns it)
        pass
    return server


def _access(address: str, gate: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """The `auth.Access` policy from `serve`'s ``**gate``, and the Panel sign-in options left in it."""
    from nbbatch._errors import InvalidArgument
    from nbbatch._ui.dashboard import auth

    unknown = sorted(set(gate) - PANEL_AUTH_OPTIONS - GATE_OPTIONS)
    if unknown:
        raise InvalidArgument(f"unknown dashboard option(s) {unknown}; `serve` takes `token` and `allow_hosts`, and "
                              f"Panel's sign-in options {sorted(PANEL_AUTH_OPTIONS)}")
    token, allow_hosts = gate.get("token"), gate.get("allow_hosts") or ()
    if token is not None and not isinstance(token, str):
        raise InvalidArgument(f"the dashboard `token` must be a string, got {type(token).__name__}")
    if isinstance(allow_hosts, str) or not all(isinstance(h, str) for h in allow_hosts):
        raise InvalidArgument(f"`allow_hosts` must be a list of host names, e.g. `allow_hosts=['proxy.example']`; "
                              f"got {allow_hosts!r}")
    panel_auth = {k: v for k, v in gate.items() if k in PANEL_AUTH_OPTIONS}
    signs_in = bool(panel_auth.get("basic_auth") or panel_auth.get("oauth_provider"))
    if signs_in and token is None and auth.TOKEN_ENV not in os.environ:
        key = None  # Panel's login stands in for the token
    else:
        key = auth.resolve_token(token)
    return auth.Access.make(address, key, allow_hosts), panel_auth


def _ready(path: str, url: str, on_ready: Callable[[str], None] | None, open_tab: Callable[[str], Any] | None) -> None:
    """The server listens at ``url``: log it, tell ``on_ready``, open a browser tab if asked."""
    log.debug("serving the nbbatch dashboard of %s at %s", path, url.split("?")[0])
    if on_ready is not None:
        on_ready(url)
    if open_tab is not None:
        open_tab(url)


def _prepare(panels: dict[str, Any], access: Any, options: dict[str, Any]) -> Any:
    """A Panel server, listening but not started, with the gate in front of every route."""
    from panel.io.server import get_server

    from nbbatch._ui.dashboard import auth

    server = get_server(panels, start=False, **options)
    tornado_app = server._tornado
    auth.install(tornado_app, access)
    # Bokeh checks the websocket's Origin against this set; the real port is known only now
    # (``port=0``), and the list Bokeh built from `websocket_origin` would need it up front.
    tornado_app._websocket_origins = set(access.websocket_origins(server.port))
    return server


def _serve_in_thread(panels: dict[str, Any], access: Any, options: dict[str, Any]) -> Any:
    """Like ``panel.serve(threaded=True)``, but gated before it serves and returning its real port."""
    from panel.io.state import state
    from panel.io.threads import StoppableThread
    from tornado.ioloop import IOLoop

    loop = IOLoop(make_current=False)
    ready: queue.Queue[Any] = queue.Queue(maxsize=1)

    def run(server_id: str) -> Any:
        try:
            server = _prepare(panels, access, {**options, "loop": loop, "server_id": server_id})
        except BaseException as exc:
            ready.put(exc)
            raise
        ready.put(server)
        server.start()
        loop.start()  # until the thread's stop() stops the loop
        server.stop()
        # Connections still open (a browser's keep-alive, a websocket) are closed here, not left to
        # the garbage collector, which would warn about each unclosed socket wherever it runs next.
        loop.close(all_fds=True)
        return None  # stopped and closed: nothing left for StoppableThread to stop

    server_id = uuid.uuid4().hex
    thread = StoppableThread(target=run, io_loop=loop, kwargs={"server_id": server_id}, owns_loop=True)
    state._threads[server_id] = thread  # so `pn.state.kill_all_servers()` stops it, as for `pn.serve`
    thread.start()
    outcome = ready.get(timeout=START_TIMEOUT_SECONDS)
    if isinstance(outcome, BaseException):
        thread.join(timeout=JOIN_TIMEOUT_SECONDS)
        raise outcome
    # What the caller needs to reach it: the real port (also for ``port=0``) and the URL with the token.
    vars(thread).update(port=int(outcome.port), url=access.url(int(outcome.port)), access=access)
    return thread
