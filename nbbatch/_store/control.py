"""Side files next to the store that a live run watches (a stop request from another process)."""

from __future__ import annotations

import os

__all__ = ["stop_file"]


def stop_file(store: str, run_id: str) -> str:
    """Path whose existence asks the live run ``run_id`` to stop at its next checkpoint."""
    return f"{os.path.abspath(store)}.{run_id}.stop"
