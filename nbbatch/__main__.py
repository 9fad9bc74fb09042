"""``python -m nbbatch``: the command line, the same as the ``nbbatch`` script."""

from __future__ import annotations

from nbbatch._ui.cli import main

if __name__ == "__main__":
    main()
