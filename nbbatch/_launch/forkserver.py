"""The process context workers start from: a forkserver that preloads torch, started early, and its lifetime.

Must not import torch: `warm_up` runs before the caller's first torch import when it can, so the
forkserver imports torch while the caller imports its own.

The forkserver is a helper of the caller's interpreter, not part of the run, so nbbatch makes it
behave like one:

- It ignores SIGTERM (multiprocessing already makes it ignore SIGINT). A scheduler or a terminal
  that signals the whole process group (``kill -TERM -PGID``) or every process must not kill it:
  workers are still running, and the launcher is the one that decides how the run ends. It still
  leaves with its clients: multiprocessing stops it once the caller and every worker closed the
  "alive" pipe, which happens when they exit, however they exit (SIGKILL included).
- When it leaves, it skips interpreter teardown (``os._exit``). Tearing down torch and
  torchvision takes about a second, more under load, and the forkserver holds the caller's
  stdout/stderr meanwhile, so ``subprocess.run(..., capture_output=True)``, ``$(...)`` and
  pipelines waited for it after the script ended. It has nothing to flush: it only forks.
- The caller stops it at exit (`_stop_at_exit`) and waits for it, so nothing of nbbatch
  outlives a finished script.

Only the forkserver nbbatch starts gets this (`_boot_forkserver`): `ensure_started` marks the
spawn with ``$NBBATCH_FORKSERVER=<caller pid>`` and this module, preloaded last, checks it.
Worker liveness never depends on the forkserver (``nbbatch._launch.workers`` watches each worker
by its own pidfd), so the forkserver dying is not fatal to a run either.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from typing import Any

__all__ = ["context", "ensure_started", "warm_up"]

logger = logging.getLogger("nbbatch")

MARKER = "NBBATCH_FORKSERVER"
STOP_WAIT_SECONDS = 2.0

# torchvision is a dependency and most processors import it: import it once, not per worker.
# This module comes last: `_boot_forkserver` registers its atexit hook after torch's, so it runs first.
PRELOAD = ["torch", "torchvision", "nbbatch._worker.entry", "nbbatch._worker.loop", "nbbatch._launch.forkserver"]

_start_lock = threading.Lock()
_stop_registered = False


def context() -> Any:
    """The multiprocessing context of workers (``$NBBATCH_START_METHOD`` overrides it)."""
    method = os.environ.get("NBBATCH_START_METHOD") or ("forkserver" if sys.platform != "win32" else "spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def ensure_started() -> None:
    """Start the forkserver if it is not running, marked as nbbatch's, and stop it at exit.

    Safe to call from any thread; a no-op for other start methods. Raises `OSError` if it cannot
    be spawned.
    """
    global _stop_registered
    if context().get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    with _start_lock:
        # The marker is in the environment only while the forkserver is spawned: it reads its
        # environment at exec, and workers get the caller's environment as it was before.
        previous = os.environ.get(MARKER)
        os.environ[MARKER] = str(os.getpid())
        try:
            forkserver.ensure_running()
        finally:
            if previous is None:
                os.environ.pop(MARKER, None)
            else:
                os.environ[MARKER] = previous
        if not _stop_registered:
            _stop_registered = True
            atexit.register(_stop_at_exit)


def _stop_at_exit() -> None:
    """Close the caller's end of the forkserver's "alive" pipe and wait (bounded) for it to leave.

    The forkserver exits once every holder of the pipe closed it; workers hold it too, and the
    launcher has joined them before this runs. Uses multiprocessing's private ``_forkserver``
    state (as its own ``_stop`` does) because the public API has no stop.
    """
    from multiprocessing import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)
    if server is None:
        return
    with server._lock:
        pid, alive_fd = server._forkserver_pid, server._forkserver_alive_fd
        if pid is None or alive_fd is None:
            return
        os.close(alive_fd)
        server._forkserver_alive_fd = None
        server._forkserver_pid = None
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return
        if done:
            return
        time.sleep(0.005)
    logger.debug("the forkserver (pid %d) did not exit within %.0fs", pid, STOP_WAIT_SECONDS)


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
    try:
        ensure_started()
    except OSError:  # pragma: no cover - workers then start on first use
        logger.debug("could not start the forkserver early", exc_info=True)


def _exit_now() -> None:
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(0)


def _boot_forkserver() -> None:
    """In nbbatch's forkserver only: ignore SIGTERM, and skip interpreter teardown when it leaves.

    Workers inherit the ignored SIGTERM until ``worker_main`` installs its own handler (a
    preemption request). They never run atexit hooks: multiprocessing ends them with ``os._exit``.
    """
    owner = os.environ.pop(MARKER, None)
    if owner is None or owner != str(os.getppid()) or "multiprocessing.forkserver" not in sys.modules:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    atexit.register(_exit_now)


_boot_forkserver()
