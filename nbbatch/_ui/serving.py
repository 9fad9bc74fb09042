"""The ``nbbatch dashboard`` command and the dashboard that ``nbbatch run --dashboard`` serves.

Both print the URL to open: the real port (also for ``--port 0``) and the access token. Panel
loads only inside, so ``nbbatch --help`` stays quick. Must not import ``_launch``, ``_worker``
or ``_store.writer``.
"""

from __future__ import annotations

import logging
from typing import Any

import click

from nbbatch._options import OPTION_HELP
from nbbatch._ui import targets
from nbbatch._ui.targets import UsageFailure

__all__ = ["DEFAULT_PORT", "dashboard_command", "serve_during_run", "stop_server"]

DEFAULT_PORT = 5006  # Panel's and Bokeh's usual port, for `nbbatch dashboard` and `nbbatch run --dashboard`

# `nbbatch dashboard` options that pick how people sign in; passed to `serve` only when given.
_SIGN_IN = ("basic_auth", "oauth_provider", "oauth_key", "oauth_secret", "oauth_redirect_uri", "cookie_secret")


def serve_during_run(store: str, port: int) -> Any:
    """Serve the dashboard from the process that runs (`run --dashboard`); None if Panel is missing."""
    try:
        from nbbatch._ui.dashboard import serve
    except ImportError as exc:
        click.echo(f"nbbatch: the dashboard is unavailable ({exc}); running without it", err=True)
        return None
    server = serve(store, port=port, address="127.0.0.1", show=False, threaded=True)
    click.echo(f"nbbatch: dashboard at {server.url}", err=True)  # the real port (--dashboard-port 0) and token
    return server


def stop_server(server: Any) -> None:
    """Stop what `serve_during_run` started; a failure here never changes the run's outcome."""
    try:
        getattr(server, "stop", lambda: None)()
    except Exception:  # the run's outcome matters more than the dashboard's shutdown
        logging.getLogger("nbbatch").debug("dashboard shutdown failed", exc_info=True)


@click.command("dashboard")
@click.option("--store", "store", default=None, help=OPTION_HELP["store"])
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True,
              help="Port to serve on; 0 picks a free one (the printed URL has it).")
@click.option("--address", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens it to the network (the token keeps others out).")
@click.option("--token", default=None, envvar="NBBATCH_DASHBOARD_TOKEN", show_envvar=True,
              help="Access token (default: a new random one); the printed URL carries it.")
@click.option("--allow-host", "allow_hosts", multiple=True, metavar="NAME",
              help="Another host name the browser may use (repeatable; e.g. a reverse proxy's). Loopback "
                   "names and --address are always allowed.")
@click.option("--basic-auth", default=None, metavar="PASSWORD|FILE",
              help="Panel's basic auth: one password, or a JSON file of users; then no token is needed.")
@click.option("--oauth-provider", default=None, metavar="NAME",
              help="Panel's OAuth provider (github, google, azure, ...); key and secret from "
                   "--oauth-key/--oauth-secret or $PANEL_OAUTH_KEY/$PANEL_OAUTH_SECRET.")
@click.option("--oauth-key", default=None, help="OAuth client id (Panel's `oauth_key`).")
@click.option("--oauth-secret", default=None, help="OAuth client secret (Panel's `oauth_secret`).")
@click.option("--oauth-redirect-uri", default=None, help="OAuth redirect URI (Panel's `oauth_redirect_uri`).")
@click.option("--cookie-secret", default=None, help="Secret that signs Panel's login cookies.")
@click.option("--show/--no-show", default=False, show_default=True, help="Open a browser tab.")
def dashboard_command(**options: Any) -> int:
    """Serve the live dashboard of a store (runs, progress, metrics, errors, resume/stop).

    It answers only requests for this machine's own names (loopback, --address, --allow-host) and
    only with the access token in the printed URL; the first visit sets a cookie.

    \b
    Examples:
      nbbatch dashboard --store runs.duckdb
      ssh -L 5006:127.0.0.1:5006 cluster-login   # then open the printed URL on your laptop
      nbbatch dashboard --store runs.duckdb --address 0.0.0.0 --port 0
    """
    try:
        from nbbatch._ui.dashboard import serve
    except ImportError as exc:
        raise click.ClickException(f"the dashboard is unavailable: {exc}") from None
    from nbbatch._errors import InvalidArgument

    path = targets.store_path(options["store"])
    sign_in = {name: options[name] for name in _SIGN_IN if options[name] is not None}

    def ready(url: str) -> None:
        click.echo(f"nbbatch: dashboard for {path} at {url} (Ctrl-C to stop)", err=True)

    try:
        serve(path, port=options["port"], address=options["address"], show=options["show"], threaded=False,
              token=options["token"], allow_hosts=options["allow_hosts"], on_ready=ready, **sign_in)
    except InvalidArgument as exc:
        raise UsageFailure(str(exc)) from None
    except KeyboardInterrupt:  # Ctrl-C is how a served dashboard ends
        pass
    return 0
