"""The process context workers start from: a forkserver that preloads torch, started early.

Must not import torch: `warm_up` runs before the caller's first torch import when it can, so the
forkserver imports torch while the caller imports its own.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import sys
import threading
from types import FrameType
from typing import Any

__all__ = ["context", "warm_up"]

logger = logging.getLogger("nbbatch")

# torchvision is a dependency and most processors import it: import it once, not per worker.
# This module comes last so that `_exit_fast_in_forkserver` registers after torch's atexit hooks.
PRELOAD = ["torch", "torchvision", "nbbatch._worker.entry", "nbbatch._worker.loop", "nbbatch._launch.forkserver"]


def context() -> Any:
    """The multiprocessing context of workers (``$NBBATCH_START_METHOD`` overrides it)."""
    method = os.environ.get("NBBATCH_START_METHOD") or ("forkserver" if sys.platform != "win32" else "spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def _fast_exit() -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0)


def _exit_fast_in_forkserver() -> None:
    """In the forkserver only, skip interpreter teardown when it exits after its parent.

    Tearing down torch and torchvision takes 1-3 s, and the forkserver holds the caller's
    stdout/stderr open meanwhile, so anything capturing a script's output (`subprocess.run`,
    `| tee`, CI) waited that long after the script ended. The forkserver has nothing to flush;
    workers forked from it leave through multiprocessing's ``os._exit`` and never run atexit.
    """
    frame: FrameType | None = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "main" and frame.f_globals.get("__name__") == "multiprocessing.forkserver":
            atexit.register(_fast_exit)
            return
        frame = frame.f_back


def warm_up() -> None:
    """Start the forkserver now, so it imports torch while the caller still sets up.

    Called when ``torch_batch_process`` is first looked up; skipped inside workers, under
    torchrun, off the main thread, and when ``NBBATCH_WARM_START=0``.
    """
    if os.environ.get("NBBATCH_WARM_START", "1") == "0" or os.environ.get("NBBATCH_LOCAL_WORKER") == "1":
        return
    if threading.current_thread() is not threading.main_thread() or mp.current_process().name != "MainProcess":
        return
    if "TORCHELASTIC_RUN_ID" in os.environ:
        return
    if context().get_start_method() == "forkserver":
        from multiprocessing import forkserver

        try:
            forkserver.ensure_running()
        except OSError:  # pragma: no cover - workers then start on first use
            logger.debug("could not start the forkserver early", exc_info=True)


_exit_fast_in_forkserver()
