"""Workers' process server forked from the caller itself (a "zygote"), when that is safe.

Must not import torch: it only looks at ``sys.modules``.

A forkserver is a fresh interpreter that has to import torch before it can fork a worker (1.0-2.3 s
on the 2-core machine, more under load, on top of whatever the caller does meanwhile). The caller
of ``torch_batch_process`` has torch imported already, so a copy of it forks workers at once. The
zygote runs multiprocessing's own forkserver loop (`multiprocessing.forkserver.main`), only it is
born by ``fork`` from the caller instead of ``exec``, and `start` fills in multiprocessing's state
as ``ForkServer.ensure_running`` does: workers are started, watched, signalled and reaped exactly
as with the forkserver.

What makes the fork safe, and makes the zygote look like a freshly exec'd forkserver:

- **It forks from a fresh thread.** libgomp keeps its OpenMP thread pool per thread that started a
  parallel region. A child forked by that thread inherits the pool without its threads, and its
  first parallel region with two threads waits for them forever (measured with torch 2.14.1:
  after any op that ran in parallel, even one ``nn.Linear`` call). A thread that never ran a
  parallel region has no pool, so neither has the zygote, and its workers build their own. The
  caller's main thread waits in ``join`` meanwhile, holding no lock.
- **Only when the caller holds no accelerator state and runs no other Python thread**
  (`unusable`): CUDA initialised in a process (even by ``torch.cuda.is_available()``, which loads
  the driver) does not work in its forks; another Python thread may hold a lock at the fork (a
  module's import lock, a stream's buffer lock) that would stay held in every worker. Native
  threads (OpenMP's, OpenBLAS's, DuckDB's) run no Python and are fine. A Jupyter kernel never
  forks either: its threads and zmq sockets aside, a zygote would keep the pages of the session's
  data alive after the notebook drops them.
- **File descriptors as after exec:** every descriptor but stdio and the server's own two is
  pointed at /dev/null. Pipes, sockets and the store's lock (an OFD lock, shared by a fork) are
  released as exec would; the numbers stay taken, so a stale Python object the zygote inherited
  (a logging handler's file) can never write into a descriptor a worker opens later.
- **Signals, memory, randomness:** Python-level signal handlers go back to the default and SIGTERM
  is ignored, as in nbbatch's forkserver; the inherited objects are frozen (``gc.freeze``) so no
  collection touches or finalises them; torch's and numpy's global generators are reseeded from
  the OS, as in a fresh interpreter; modules half-imported at the fork are dropped, so workers
  import them anew instead of finding half of them.
- **One zygote per call:** `nbbatch._launch.forkserver.release` retires it when the call ends, so
  it never keeps memory the caller frees afterwards.

The process is named ``nbbatch-zygote`` and its workers ``nbbatch-worker`` (``ps -o comm``,
``top``, ``psutil.Process.name()``); their command line is the caller's.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import os
import signal
import socket
import sys
import threading
import traceback
import warnings
from typing import Any, NoReturn

__all__ = ["WORKER_NAME", "ZYGOTE_NAME", "expected", "name_process", "name_workers", "start", "unusable"]

ZYGOTE_NAME = "nbbatch-zygote"
WORKER_NAME = "nbbatch-worker"
_PR_SET_NAME = 15
# Loaded before any fork: a child must not need the dynamic loader's lock.
_LIBC: Any = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


def name_process(name: str) -> None:
    """Set this process's name (``comm``, 15 bytes at most) where the platform allows it."""
    if _LIBC is not None:
        _LIBC.prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def _cuda_touched() -> bool:
    """Whether this process loaded a GPU driver or initialised CUDA (either breaks CUDA in a fork)."""
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    try:
        if cuda is not None and cuda.is_initialized():
            return True
    except Exception:  # pragma: no cover - a partial torch: do not fork
        return True
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return any("libcuda.so" in line or "libamdhip64.so" in line for line in maps)
    except OSError:  # pragma: no cover - no /proc: do not fork
        return True


def _static_reason() -> str | None:
    """Why this process can never fork a zygote, whatever it does before the call."""
    if os.environ.get("NBBATCH_ZYGOTE", "1") == "0":
        return "NBBATCH_ZYGOTE=0"
    if not sys.platform.startswith("linux"):
        return f"the platform is {sys.platform}, not Linux"
    if "ipykernel" in sys.modules:
        return "the caller is a Jupyter kernel"
    from multiprocessing import forkserver

    if "authkey_r" in inspect.signature(forkserver.main).parameters:
        return "this Python's forkserver authenticates its clients, which the zygote does not do yet"
    return None


def unusable() -> str | None:
    """Why the caller cannot be forked into a zygote now, or None when it can."""
    reason = _static_reason()
    if reason is not None:
        return reason
    torch = sys.modules.get("torch")
    if torch is None or getattr(getattr(torch, "__spec__", None), "_initializing", False):
        return "torch is not imported yet"
    if getattr(getattr(torch, "version", None), "hip", None):
        return "a ROCm build of torch"
    if _cuda_touched():
        return "CUDA is initialised (or its driver loaded) in the caller"
    return _threads_reason()


def _threads_reason() -> str | None:
    """Other Python threads could hold a lock (an import's, a stream's) that a fork would keep held forever."""
    others = [t.name for t in threading.enumerate() if t is not threading.current_thread()]
    if others:
        return f"other Python threads run in the caller ({', '.join(sorted(others)[:3])})"
    return None


def expected() -> bool:
    """Whether the coming call will most likely fork a zygote (so no forkserver needs starting early).

    On a machine with an NVIDIA or AMD driver the caller often touches CUDA before the call (a
    ``torch.cuda.is_available()`` is enough), so the forkserver starts early there, as before.
    """
    if _static_reason() is not None:
        return False
    if any(os.path.exists(p) for p in ("/proc/driver/nvidia/version", "/dev/kfd")):
        return False
    if "torch" not in sys.modules:
        return _threads_reason() is None
    return unusable() is None


def start(server: Any) -> int:
    """Fork a zygote and register it in ``server``, multiprocessing's `ForkServer`; return its pid.

    The caller holds ``server._lock``. Raises `OSError` when the fork fails.
    """
    from multiprocessing import connection, resource_tracker, util

    resource_tracker.ensure_running()
    with socket.socket(socket.AF_UNIX) as listener:
        address = connection.arbitrary_address("AF_UNIX")  # type: ignore[attr-defined]
        listener.bind(address)
        if not util.is_abstract_socket_namespace(address):
            os.chmod(address, 0o600)
        listener.listen()
        alive_r, alive_w = os.pipe()
        try:
            pid = _fork(listener.fileno(), alive_r)
        except BaseException:
            os.close(alive_w)
            raise
        finally:
            os.close(alive_r)
    server._forkserver_address = address
    server._forkserver_alive_fd = alive_w
    server._forkserver_pid = pid
    return pid


def _fork(listener_fd: int, alive_r: int) -> int:
    """Fork from a thread that never ran an OpenMP region; the child serves and never returns."""
    for stream in (sys.stdout, sys.stderr):  # or their buffered text would be written twice
        try:
            stream.flush()
        except (AttributeError, ValueError, OSError):
            pass
    pids: list[int] = []
    errors: list[BaseException] = []

    def fork() -> None:
        try:
            with warnings.catch_warnings():
                # Python 3.12+ warns about fork in a multi-threaded process; see the module docstring.
                warnings.simplefilter("ignore", DeprecationWarning)
                pid = os.fork()
        except BaseException as exc:
            errors.append(exc)
            return
        if pid == 0:
            _serve(listener_fd, alive_r)
        pids.append(pid)

    thread = threading.Thread(target=fork, name="nbbatch-zygote-fork", daemon=True)
    thread.start()
    try:
        thread.join()
    finally:
        thread.join()  # an interrupt in the first join must not leave the fork in flight
    if errors:
        raise errors[0]
    return pids[0]


def _serve(listener_fd: int, alive_r: int) -> NoReturn:
    """The zygote: become a freshly exec'd forkserver, then run multiprocessing's forkserver loop."""
    code = 0
    try:
        name_process(ZYGOTE_NAME)
        _descriptors_as_after_exec({0, 1, 2, listener_fd, alive_r})
        _signals_as_after_exec()
        gc.freeze()
        _fresh_state()
        from multiprocessing import forkserver

        name_workers()
        forkserver.main(listener_fd, alive_r, [])
    except SystemExit:  # every client closed the "alive" pipe
        pass
    except BaseException:
        code = 1
        traceback.print_exc()
    finally:
        try:
            sys.stderr.flush()
        finally:
            os._exit(code)


def _descriptors_as_after_exec(keep: set[int]) -> None:
    null = os.open(os.devnull, os.O_RDWR | os.O_CLOEXEC)
    try:
        for fd in sorted(int(name) for name in os.listdir("/proc/self/fd")):
            if fd in keep or fd == null:
                continue
            try:
                os.dup2(null, fd, inheritable=False)
            except OSError:  # the listing's own descriptor, closed by now
                continue
    finally:
        os.close(null)


def _signals_as_after_exec() -> None:
    signal.set_wakeup_fd(-1)
    for sig in signal.valid_signals():
        try:
            handler = signal.getsignal(sig)
            if callable(handler) and handler is not signal.default_int_handler:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            continue
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # As nbbatch's forkserver: a group SIGTERM is the launcher's to handle (see forkserver.py).
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _fresh_state() -> None:
    """Multiprocessing's, the random generators' and the import system's state as in a new interpreter."""
    from multiprocessing import forkserver, resource_tracker

    for shared in (forkserver._forkserver, resource_tracker._resource_tracker):
        fresh = type(shared)().__dict__  # unlocked locks, no inherited descriptors or pids
        shared.__dict__.update({k: v for k, v in fresh.items() if k != "_preload_modules"})
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.default_generator.seed()
    numpy_random = sys.modules.get("numpy.random")
    if numpy_random is not None:
        numpy_random.seed()
    for name, module in list(sys.modules.items()):
        if getattr(getattr(module, "__spec__", None), "_initializing", False):
            del sys.modules[name]


def name_workers() -> None:
    """In a server process: name every worker it forks ``nbbatch-worker`` (zygote and forkserver alike)."""
    from multiprocessing import forkserver

    serve_one = forkserver._serve_one  # type: ignore[attr-defined]

    def serve_one_named(*args: Any) -> Any:
        name_process(WORKER_NAME)
        return serve_one(*args)

    forkserver._serve_one = serve_one_named  # type: ignore[attr-defined]
