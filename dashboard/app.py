"""``panel serve dashboard/app.py --args --store PATH``: the nbbatch dashboard as a Panel app.

The same page as ``nbbatch dashboard --store PATH``; the code lives in ``nbbatch._ui.dashboard``.
"""

import argparse
import sys

from nbbatch._ui.dashboard.app import build

parser = argparse.ArgumentParser(prog="panel serve dashboard/app.py --args")
parser.add_argument("--store", default="nbbatch.duckdb", help="the DuckDB store file")
parser.add_argument("--run", default=None, help="name or id of the run to show first")
args = parser.parse_args(sys.argv[1:])
build(args.store, run=args.run).servable(title="nbbatch")
