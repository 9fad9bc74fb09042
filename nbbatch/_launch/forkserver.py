"""The process server workers start from, and its lifetime: a zygote forked from the caller, or a forkserver.

Must not import torch: `warm_up` runs before the caller's first torch import when it can, so the
forkserver imports torch while the caller imports its own.

`ensure_started` picks the server. Where the caller may be forked (a script on Linux without CUDA
initialised, see `nbbatch._launch.zygote`), it forks a zygote: workers then start in milliseconds,
because the caller has imported torch already, instead of waiting 1-2 s for a fresh interpreter to
import it. `release` retires the zygote when the call ends. Elsewhere (Jupyter kernels, a caller
that initialised CUDA, ``NBBATCH_ZYGOTE=0``) it starts the forkserver below, which stays warm for
later calls; `warm_up` starts it early where the zygote is not expected.

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

from nbbatch._launch import zygote

__all__ = ["context", "ensure_started", "release", "server_kind", "warm_up"]

logger = logging.getLogger("nbbatch")

MARKER = "NBBATCH_FORKSERVER"
STOP_WAIT_SECONDS = 2.0

# torchvision is a dependency and most processors import it: import it once, not per worker.
# This module comes last: `_boot_forkserver` registers its atexit hook after torch's, so it runs first.
PRELOAD = ["torch", "torchvision", "nbbatch._worker.entry", "nbbatch._worker.loop", "nbbatch._launch.forkserver"]

_start_lock = threading.Lock()
_stop_registered = False
_zygote_pid: int | None = None  # the running server, when it is a zygote
_retired: list[int] = []  # zygotes told to leave, not reaped yet


def context() -> Any:
    """The multiprocessing context of workers (``$NBBATCH_START_METHOD`` overrides it)."""
    method = os.environ.get("NBBATCH_START_METHOD") or ("forkserver" if sys.platform != "win32" else "spawn")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(PRELOAD)
    return ctx


def ensure_started() -> None:
    """Make sure a server for workers runs: a zygote when the caller can be forked, else the forkserver.

    Call it as early in a call as possible, before the store is opened: a zygote is forked now
    (~15 ms), a forkserver imports torch in the background. Safe to call from any thread; a no-op
    for other start methods and while a server runs. Raises `OSError` if it cannot be started.
    """
    global _stop_registered, _zygote_pid
    if context().get_start_method() != "forkserver":
        return
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver
    with _start_lock:
        if not _stop_registered:
            _stop_registered = True
            atexit.register(_stop_at_exit)
        _reap(wait=0.0)
        if _running(server):
            return
        why = zygote.unusable()
        if why is None:
            with server._lock:
                _zygote_pid = zygote.start(server)
            logger.debug("workers start from a zygote (pid %d) forked from this process", _zygote_pid)
            return
        logger.debug("workers start from a forkserver: no zygote because %s", why)
        _spawn_forkserver()


def _spawn_forkserver() -> None:
    """Spawn multiprocessing's forkserver, marked as nbbatch's (see `_boot_forkserver`)."""
    from multiprocessing import forkserver

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


def server_kind() -> str | None:
    """``"zygote"`` or ``"forkserver"`` for the server running now, None when none runs."""
    from multiprocessing import forkserver

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid is None:
        return None
    return "zygote" if pid == _zygote_pid else "forkserver"


def release() -> None:
    """Retire this call's zygote once its workers are gone (a forkserver stays warm for later calls).

    The zygote leaves as soon as nobody holds its "alive" pipe, so it never keeps memory the caller
    frees after the call. It is reaped by the next `ensure_started` or at exit.
    """
    global _zygote_pid
    from multiprocessing import forkserver

    server: Any = forkserver._forkserver
    with _start_lock, server._lock:
        if _zygote_pid is None or server._forkserver_pid != _zygote_pid:
            return
        _retired.append(_zygote_pid)
        _forget(server)
        _zygote_pid = None


def _running(server: Any) -> bool:
    """Whether ``server``'s process still runs; forgets it (as ``ensure_running`` does) when not."""
    global _zygote_pid
    with server._lock:
        pid = server._forkserver_pid
        if pid is None:
            return False
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if not done:
            return True
        _forget(server)
        if pid == _zygote_pid:
            _zygote_pid = None
        return False


def _forget(server: Any) -> None:
    """Close the caller's end of the "alive" pipe and clear multiprocessing's record (lock held)."""
    if server._forkserver_alive_fd is not None:
        os.close(server._forkserver_alive_fd)
    server._forkserver_alive_fd = None
    server._forkserver_address = None
    server._forkserver_pid = None


def _reap(wait: float) -> None:
    """Reap retired zygotes, waiting up to ``wait`` seconds for them to leave."""
    deadline = time.monotonic() + wait
    while _retired:
        for pid in list(_retired):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done:
                _retired.remove(pid)
        if not _retired or time.monotonic() >= deadline:
            return
        time.sleep(0.005)


def _stop_at_exit() -> None:
    """Close the caller's end of the server's "alive" pipe and wait (bounded) for it to leave.

    The server exits once every holder of the pipe closed it; workers hold it too, and the
    launcher has joined them before this runs. Uses multiprocessing's private ``_forkserver``
    state (as its own ``_stop`` does) because the public API has no stop.
    """
    from multiprocessing import forkserver

    server: Any = getattr(forkserver, "_forkserver", None)
    if server is None:
        return
    with server._lock:
        pid = server._forkserver_pid
        if pid is not None and server._forkserver_alive_fd is not None:
            _retired.append(pid)
            _forget(server)
    _reap(wait=STOP_WAIT_SECONDS)
    if _retired:
        logger.debug("nbbatch's worker server (pids %s) did not exit within %.0fs", _retired, STOP_WAIT_SECONDS)


def warm_up() -> None:
    """Start the forkserver now, so it imports torch while the caller still sets up.

    Called when ``torch_batch_process`` is first looked up; skipped where the call will fork a
    zygote instead (`zygote.expected`), inside workers, under torchrun, off the main thread, and
    when ``NBBATCH_WARM_START=0``.
    """
    if os.environ.get("NBBATCH_WARM_START", "1") == "0" or os.environ.get("NBBATCH_LOCAL_WORKER") == "1":
        return
    if threading.current_thread() is not threading.main_thread() or mp.current_process().name != "MainProcess":
        return
    if "TORCHELASTIC_RUN_ID" in os.environ or zygote.expected():
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
    """In nbbatch's forkserver only: ignore SIGTERM, skip interpreter teardown when it leaves, name workers.

    Workers inherit the ignored SIGTERM until ``worker_main`` installs its own handler (a
    preemption request). They never run atexit hooks: multiprocessing ends them with ``os._exit``.
    """
    owner = os.environ.pop(MARKER, None)
    if owner is None or owner != str(os.getppid()) or "multiprocessing.forkserver" not in sys.modules:
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    atexit.register(_exit_now)
    zygote.name_workers()


_boot_forkserver()
