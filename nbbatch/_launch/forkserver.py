"""The process context workers start from: a forkserver that preloads torch, started early.

Must not import torch: `warm_up` runs before the caller's first torch import when it can, so the
forkserver imports torch while the caller imports its own.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import threading
from typing import Any

__all__ = ["context", "warm_up"]

logger = logging.getLogger("nbbatch")

# torchvision is a dependency and most processors import it: import it once, not per worker.
PRELOAD = ["torch", "torchvision", "nbbatch._worker.entry", "nbbatch._worker.loop"]


def context() -> Any:
    """The multiprocessing context of workers (``$NBBATCH_START_METHOD`` overrides it)."""
    method = os.environ.get("NBBATCH_START_METHOD") or ("forkserver" if sys.platform != "win32" else "spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


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
