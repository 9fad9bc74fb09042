"""Entry point of a locally launched worker process: environment, signals, lifeline, group.

The launcher keeps the write end of a control pipe. "stop" on it, or a SIGTERM to the worker, asks
for a graceful stop at the next checkpoint; end-of-file means the launcher died, and the worker
exits at once, so workers never outlive their launcher (PR_SET_PDEATHSIG would watch the
forkserver, not the launcher). SIGINT is ignored: the launcher decides what Ctrl-C means.
"""

from __future__ import annotations

import datetime as dt
import os
import signal
import sys
import threading
from multiprocessing.connection import Connection
from typing import Any

import cloudpickle

__all__ = ["PipeSink", "worker_main"]


class PipeSink:
    """Sends events down this worker's own pipe (one pipe per worker: a dying worker can't block others)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def emit(self, event: Any) -> None:
        self.conn.send(event)

    def flush(self, coordinator: Any) -> None:
        return None


def _watch_control(control: Connection, stop: threading.Event) -> None:
    try:
        while True:
            message = control.recv()
            if message == "stop":
                stop.set()
    except (EOFError, OSError):
        # The launcher is gone (or closed us): nobody can commit our work any more.
        os._exit(3)


def worker_main(
    rank: int,
    world_size: int,
    payload: bytes,
    conn: Connection,
    control: Connection,
    master: tuple[str, int],
    threads: int,
    environ: dict[str, str],
    cwd: str,
    sys_path: list[str],
) -> None:
    """Run one local worker; the exit code is 0 on done/preempted and 1 on failure."""
    # The launcher decides what Ctrl-C means. Jupyter's interrupt and a terminal's Ctrl-C signal the
    # whole process group, which would also kill DataLoader workers; a session of our own avoids it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    # SLURM's preemption and container stops send SIGTERM to every process: here it asks for a stop
    # at the next checkpoint (as the launcher's "stop" does), so the committed work is kept.
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    os.environ.clear()
    os.environ.update(environ)
    os.environ.update(
        {"NBBATCH_LOCAL_WORKER": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)}
    )
    try:
        os.chdir(cwd)
    except OSError:
        pass
    sys.path[:] = sys_path
    threading.Thread(target=_watch_control, args=(control, stop), daemon=True, name="nbbatch-control").start()

    import torch

    torch.set_num_threads(threads)
    from nbbatch._worker.collective import SoloCoordinator, TorchCoordinator
    from nbbatch._worker.loop import run_loop

    sink = PipeSink(conn)
    status = "failed"
    try:
        spec = cloudpickle.loads(payload)
        coordinator: Any
        if world_size > 1:
            import torch.distributed as dist

            if torch.cuda.is_available() and torch.cuda.device_count() > rank:
                torch.cuda.set_device(rank)
            dist.init_process_group(
                "gloo",
                init_method=f"tcp://{master[0]}:{master[1]}",
                rank=rank,
                world_size=world_size,
                timeout=dt.timedelta(minutes=30),
            )
            coordinator = TorchCoordinator()
        else:
            coordinator = SoloCoordinator()
        status = run_loop(spec, rank, rank, coordinator, sink, stop.is_set)
    except BaseException as exc:  # report anything, even unpickling errors, before dying
        import time
        import traceback

        from nbbatch._events import BatchFailed

        try:
            sink.emit(
                BatchFailed(rank, None, None, (), type(exc).__name__, str(exc),
                            "".join(traceback.format_exception(exc)), True, time.time())
            )
        except Exception:
            pass
    finally:
        try:
            conn.close()
        except OSError:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if status in ("done", "preempted") else 1)
