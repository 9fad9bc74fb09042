"""Side files next to the store that a live run watches (a stop request from another process)."""

from __future__ import annotations

import contextlib
import os

__all__ = ["clear_stop", "stop_file"]


def stop_file(store: str, run_id: str) -> str:
    """Path whose existence asks the live run ``run_id`` to stop at its next checkpoint."""
    return f"{os.path.abspath(store)}.{run_id}.stop"


def clear_stop(store: str, run_id: str) -> None:
    """Drop a stop request made before this attempt began (e.g. `Run.stop()` on a run that had ended)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stop_file(store, run_id))
