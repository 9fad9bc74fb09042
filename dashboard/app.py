"""``panel serve dashboard/app.py --args --store PATH``: the nbbatch dashboard as a Panel app.

The same page as ``nbbatch dashboard --store PATH``; the code lives in ``nbbatch._ui.dashboard``.
Panel's server does not run nbbatch's gate, so each session checks itself: its ``Host`` must be a
loopback name or an ``--allow-host``; with ``--token`` (or ``$NBBATCH_DASHBOARD_TOKEN``) a session
needs ``?token=`` in its URL; without one it is read-only unless Panel signed its user in
(``panel serve --basic-auth`` / ``--oauth-provider``).
"""

import argparse
import os
import sys

from nbbatch._run import DEFAULT_STORE
from nbbatch._ui.dashboard.app import build
from nbbatch._ui.dashboard.auth import TOKEN_ENV, Access

parser = argparse.ArgumentParser(prog="panel serve dashboard/app.py --args")
parser.add_argument("--store", default=DEFAULT_STORE, help="the DuckDB store file")
parser.add_argument("--run", default=None, help="name or id of the run to show first")
parser.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                    help=f"access token that a URL's ?token= must carry (default: ${TOKEN_ENV})")
parser.add_argument("--allow-host", dest="allow_hosts", action="append", default=[], metavar="NAME",
                    help="another host name the browser may use (repeatable)")
args = parser.parse_args(sys.argv[1:])
access = Access.make("127.0.0.1", args.token, args.allow_hosts)
build(args.store, run=args.run, access=access).servable(title="nbbatch")
