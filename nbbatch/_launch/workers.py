"""Worker processes of the local launcher, watched by their own pidfd rather than through the forkserver.

multiprocessing learns a forkserver child's exit from the forkserver's status pipe; if the
forkserver dies (a SIGTERM to the process group did that), ``Popen.poll`` reports exit code 255
for every worker while they still run. So liveness here comes from the kernel: a pidfd
(``os.pidfd_open``, Linux 5.3+) becomes readable when that process exits, whoever its parent is,
and ``signal.pidfd_send_signal`` cannot hit a reused pid. The forkserver's report is used only for
the exit code, and only while the forkserver lives. Elsewhere (macOS, old kernels, spawn) the
multiprocessing sentinel is the fallback.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import time
from typing import Any

__all__ = ["GRACE_SECONDS", "WorkerProcess", "kill_all", "shut_down"]

GRACE_SECONDS = 3.0
EXIT_CODE_WAIT = 0.5


class WorkerProcess:
    """A started worker: its multiprocessing ``Process`` (start, exit code) and a pidfd (liveness, signals).

    Args:
        proc: a started ``multiprocessing.Process``.
    """

    def __init__(self, proc: Any) -> None:
        self.proc = proc
        self.pid: int = proc.pid
        self.pidfd: int | None = None
        self._gone = False
        self._code: int | None = None
        if hasattr(os, "pidfd_open"):
            try:
                self.pidfd = os.pidfd_open(self.pid)
            except ProcessLookupError:  # already gone (and reaped): the forkserver knows its code
                self._gone = True
            except OSError:  # pragma: no cover - kernel without pidfd
                self.pidfd = None

    @property
    def sentinel(self) -> Any:
        """Readable once the process has exited (for ``multiprocessing.connection.wait``)."""
        return self.pidfd if self.pidfd is not None else self.proc.sentinel

    def alive(self) -> bool:
        """Whether the process still runs (exited-but-unreaped counts as exited)."""
        if self._gone:
            return False
        if self.pidfd is not None:
            ready, _, _ = select.select([self.pidfd], [], [], 0)
            self._gone = bool(ready)
        else:
            self._gone = not self.proc.is_alive()
        return not self._gone

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit; True once it has."""
        if self._gone:
            return True
        if self.pidfd is not None:
            ready, _, _ = select.select([self.pidfd], [], [], max(0.0, timeout))
            self._gone = bool(ready)
            return self._gone
        self.proc.join(timeout)
        return not self.alive()

    def exitcode(self) -> int | None:
        """The exit code (negative: killed by that signal) once exited; None while it runs or if unknown.

        The code comes from the forkserver, which reaps the worker a moment after it exits. If the
        forkserver is gone, multiprocessing reports 255 for any child; that is not the worker's
        code, so it is reported as unknown.
        """
        if self._code is not None:
            return self._code
        if self.alive():
            return None
        self.proc.join(EXIT_CODE_WAIT)
        code: int | None = self.proc.exitcode
        if code == 255 and self.pidfd is not None and not _forkserver_alive():
            return None
        self._code = code
        return code

    def send(self, sig: int) -> None:
        """Send ``sig`` to the worker if it still runs."""
        if not self.alive():
            return
        with contextlib.suppress(ProcessLookupError):
            if self.pidfd is not None:
                signal.pidfd_send_signal(self.pidfd, sig)
            else:
                os.kill(self.pid, sig)

    def close(self) -> None:
        """Release the pidfd (the process itself is left alone)."""
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None


def _forkserver_alive() -> bool:
    from multiprocessing import forkserver

    pid = getattr(getattr(forkserver, "_forkserver", None), "_forkserver_pid", None)
    if pid is None:
        return False
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return not done


def kill_all(workers: list[WorkerProcess], seconds: float = GRACE_SECONDS) -> None:
    """SIGKILL every worker still running and wait up to ``seconds`` for them to exit.

    Not SIGTERM: a worker takes SIGTERM as a request to stop at its next checkpoint (schedulers
    send it to every process), while this is for runs that are over (an error, a second Ctrl-C).
    """
    for w in workers:
        w.send(signal.SIGKILL)
    deadline = time.monotonic() + seconds
    for w in workers:
        w.wait(deadline - time.monotonic())


def shut_down(workers: list[WorkerProcess]) -> None:
    """Give workers ``GRACE_SECONDS`` to leave (their control pipes are closed), then kill the rest."""
    deadline = time.monotonic() + GRACE_SECONDS
    for w in workers:
        w.wait(deadline - time.monotonic())
    kill_all(workers)
    for w in workers:
        w.exitcode()  # let multiprocessing reap its side, so it keeps no zombie bookkeeping
        w.close()
