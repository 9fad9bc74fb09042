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
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["PANEL_AUTH_OPTIONS", "dashboard", "serve"]

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

    from nbbatch._run import default_store
    from nbbatch._ui.dashboard.app import build

    if _in_notebook() and not getattr(pn.extension, "_loaded", False):
        pn.extension()  # loads Panel's JS into the notebook once
    return build(store or default_store(), run=run, period_ms=refresh_ms)


def _in_notebook() -> bool:
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


#: Panel's options for signing users in, passed through to `panel.serve` (see its docs).
PANEL_AUTH_OPTIONS = frozenset({
    "basic_auth", "basic_login_template", "cookie_secret", "login_endpoint", "login_template", "logout_endpoint",
    "logout_template", "oauth_encryption_key", "oauth_error_template", "oauth_extra_params",
    "oauth_guest_endpoints", "oauth_jwt_user", "oauth_key", "oauth_optional", "oauth_provider",
    "oauth_redirect_uri", "oauth_refresh_tokens", "oauth_secret",
})


def serve(
    store: str, port: int = 0, address: str = "127.0.0.1", show: bool = False, threaded: bool = False, *,
    token: str | None = None, allow_hosts: Iterable[str] = (), on_ready: Callable[[str], None] | None = None,
    **panel_auth: Any,
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
        token: the access token (default: ``$NBBATCH_DASHBOARD_TOKEN``, else a random one).
        allow_hosts: more host names the browser may use, e.g. a reverse proxy's (``*``: any).
        on_ready: called with the full URL (real port, token) once the server listens.
        **panel_auth: Panel's ``basic_auth``, ``oauth_provider``, ``oauth_key``, ``oauth_secret``,
            ``cookie_secret``... (`PANEL_AUTH_OPTIONS`), passed to `panel.serve`.

    Returns:
        The server thread (``threaded=True``) or the Bokeh server once it stopped.

    Raises:
        InvalidArgument: an option Panel does not know, or an empty token.

    Example:
        >>> server = serve("nbbatch.duckdb", port=0, threaded=True)   # doctest: +SKIP
        >>> server.url                                                 # doctest: +SKIP
        'http://127.0.0.1:40123/?token=...'
        >>> server.stop()                                              # doctest: +SKIP
    """
    from nbbatch._errors import InvalidArgument
    from nbbatch._ui.dashboard import auth, values
    from nbbatch._ui.dashboard.app import build

    unknown = sorted(set(panel_auth) - PANEL_AUTH_OPTIONS)
    if unknown:
        raise InvalidArgument(f"unknown dashboard option(s) {unknown}; Panel's sign-in options are "
                              f"{sorted(PANEL_AUTH_OPTIONS)}")
    signs_in = bool(panel_auth.get("basic_auth") or panel_auth.get("oauth_provider"))
    if signs_in and token is None and auth.TOKEN_ENV not in os.environ:
        key = None  # Panel's login stands in for the token
    else:
        key = auth.resolve_token(token)
    access = auth.Access.make(address, key, allow_hosts)
    path = os.path.abspath(store)
    options: dict[str, Any] = {
        "port": port, "address": address, "title": "nbbatch", "verbose": False, "show": False, **panel_auth,
    }
    panels = {"/": lambda: build(path, access=access, full_links=True)}
    options["extra_patterns"] = [(values.PATH, values.FullValueHandler, {"store": path})]
    if threaded:
        thread = _serve_in_thread(panels, access, options)
        log.debug("serving the nbbatch dashboard of %s at %s", path, str(thread.url).split("?")[0])
        if on_ready is not None:
            on_ready(thread.url)
        if show:
            webbrowser.open(thread.url)
        return thread
    server = _prepare(panels, access, options)
    url = access.url(server.port)
    log.debug("serving the nbbatch dashboard of %s at %s", path, url.split("?")[0])
    if on_ready is not None:
        on_ready(url)
    if show:
        server.io_loop.add_callback(webbrowser.open, url)
    server.start()
    try:
        server.io_loop.start()  # until Ctrl-C (Panel's SIGINT handler stops the loop)
    except RuntimeError:  # the loop was already running (an embedding application owns it)
        pass
    return server


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
        return server

    server_id = uuid.uuid4().hex
    thread = StoppableThread(target=run, io_loop=loop, kwargs={"server_id": server_id}, owns_loop=True)
    state._threads[server_id] = thread  # so `pn.state.kill_all_servers()` stops it, as for `pn.serve`
    thread.start()
    outcome = ready.get(timeout=120)
    if isinstance(outcome, BaseException):
        thread.join(timeout=30)
        raise outcome
    # What the caller needs to reach it: the real port (also for ``port=0``) and the URL with the token.
    vars(thread).update(port=int(outcome.port), url=access.url(int(outcome.port)), access=access)
    return thread
