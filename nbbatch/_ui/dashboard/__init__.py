"""The Panel dashboard: inline in a notebook (`dashboard`) or served (`serve`, `nbbatch dashboard`).

Panel loads only when a dashboard is asked for, so ``import nbbatch`` and the CLI stay quick.
Layout and refresh live in ``app``, the SQL in ``queries``, HTML in ``views``, Stop/Resume in
``control``. Must not import ``_launch``, ``_worker`` or ``_store.writer``.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Any

__all__ = ["dashboard", "serve"]

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


def _free_port(address: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def serve(store: str, port: int = 0, address: str = "127.0.0.1", show: bool = False, threaded: bool = False) -> Any:
    """Serve the dashboard of ``store`` at ``http://ADDRESS:PORT/``.

    Args:
        store: the DuckDB store to show (it need not exist yet; the page says so until it does).
        port: TCP port; ``0`` picks a free one (read it back from the returned server's ``.port``).
        address: interface to listen on; ``127.0.0.1`` keeps it on this machine.
        show: open a browser tab.
        threaded: serve from a background thread and return at once (the returned object has
            ``.stop()``); otherwise block until Ctrl-C.

    Returns:
        The Panel server thread (``threaded=True``, with ``.port`` and ``.stop()``) or the Bokeh
        server once it stopped.

    Example:
        >>> server = serve("nbbatch.duckdb", port=0, threaded=True)   # doctest: +SKIP
        >>> server.port, server.stop()                                 # doctest: +SKIP
    """
    import panel as pn

    from nbbatch._ui.dashboard.app import build

    path = os.path.abspath(store)
    if not port:
        port = _free_port(address)
        log.info("nbbatch: dashboard at http://%s:%d", address, port)  # the caller could not know it
    if address in ("0.0.0.0", "::", ""):
        origins = ["*"]  # every interface: the browser may use any of this machine's names
    else:
        hosts = {address, "127.0.0.1", "localhost"} if address in ("127.0.0.1", "localhost") else {address}
        origins = [f"{host}:{port}" for host in sorted(hosts)]
    log.debug("serving the nbbatch dashboard of %s at http://%s:%d", path, address, port)
    server = pn.serve(  # type: ignore[no-untyped-call]
        {"/": lambda: build(path)}, port=port, address=address, show=show, threaded=threaded, title="nbbatch",
        websocket_origin=origins, verbose=False,
    )
    if threaded:
        server.port = port
    return server
