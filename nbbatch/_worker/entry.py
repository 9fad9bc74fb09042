"""Entry point of a locally launched worker process: environment, signals, lifeline, group.

The launcher keeps the write end of a control pipe. `Control.STOP` on it, or a SIGTERM to the
worker, asks for a graceful stop at the next checkpoint; end-of-file means the launcher died, and
the worker exits at once, so workers never outlive their launcher (PR_SET_PDEATHSIG would watch the
forkserver, not the launcher). SIGINT is ignored: the launcher decides what Ctrl-C means.
Must not import DuckDB, ``_store``, ``_launch`` or ``_ui``.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler
from typing import TYPE_CHECKING

import cloudpickle

from nbbatch._events import Control, Event, Status
from nbbatch._worker.sink import NotSent

if TYPE_CHECKING:
    from nbbatch._worker.collective import Coordinator

__all__ = ["EXIT_FAILED", "EXIT_LAUNCHER_GONE", "EXIT_OK", "PipeSink", "WorkerArgs", "worker_main"]

#: Exit codes of a local worker: done or preempted, failed, and "the launcher is gone".
EXIT_OK = 0
EXIT_FAILED = 1
EXIT_LAUNCHER_GONE = 3


@dataclass(frozen=True)
class WorkerArgs:
    """What the launcher hands one local worker process (pickled by multiprocessing, pipes included).

    Attributes:
        rank: this worker's rank (also its local rank: one machine).
        world_size: number of workers.
        payload: the cloudpickled `nbbatch._worker.loop.WorkerSpec`.
        events: write end of this worker's event pipe.
        control: read end of this worker's control pipe (`Control` messages; end-of-file: launcher gone).
        master: ``(host, port)`` of the gloo rendezvous when ``world_size > 1``.
        threads: torch intra-op threads.
        environ: the launcher's environment, installed as the worker's own.
        cwd: the launcher's working directory.
        sys_path: the launcher's ``sys.path`` (notebook-local modules import the same way).
    """

    rank: int
    world_size: int
    payload: bytes
    events: Connection
    control: Connection
    master: tuple[str, int]
    threads: int
    environ: dict[str, str]
    cwd: str
    sys_path: list[str]


class PipeSink:
    """Sends events down this worker's own pipe (one pipe per worker: a dying worker can't block others)."""

    #: `emit` pickles each event (as ``Connection.send`` does) and raises `NotSent` before writing if it cannot.
    pickles = True

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def emit(self, event: Event) -> None:
        """Send one event; raises `NotSent` (nothing sent) if it does not pickle."""
        try:
            data = ForkingPickler.dumps(event)
        except Exception as exc:
            raise NotSent(f"the {type(event).__name__} event cannot be pickled ({type(exc).__name__}: {exc})") from exc
        self.conn.send_bytes(data)

    def flush(self, coordinator: Coordinator) -> None:
        """Nothing to do: every event already left."""
        return None


def _watch_control(control: Connection, stop: threading.Event) -> None:
    """Set ``stop`` on `Control.STOP`; leave the process when the launcher's end closes."""
    try:
        while True:
            if control.recv() == Control.STOP:
                stop.set()
    except (EOFError, OSError):
        # The launcher is gone (or closed us): nobody can commit our work any more.
        os._exit(EXIT_LAUNCHER_GONE)


def _install(args: WorkerArgs) -> threading.Event:
    """Make this process the launcher's worker: signals, session, environment, paths, control pipe.

    Returns the event that asks for a stop at the next checkpoint.
    """
    # The launcher decides what Ctrl-C means. Jupyter's interrupt and a terminal's Ctrl-C signal the
    # whole process group, which would also kill DataLoader workers; a session of our own avoids it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    stop = threading.Event()
    # SLURM's preemption and container stops send SIGTERM to every process: here it asks for a stop
    # at the next checkpoint (as the launcher's `Control.STOP` does), so the committed work is kept.
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        os.setsid()
    except OSError:  # already a session leader
        pass
    os.environ.clear()
    os.environ.update(args.environ)
    ranks = {"RANK": args.rank, "LOCAL_RANK": args.rank, "WORLD_SIZE": args.world_size, "LOCAL_WORLD_SIZE": args.world_size}
    os.environ.update({"NBBATCH_LOCAL_WORKER": "1", **{k: str(v) for k, v in ranks.items()}})
    try:
        os.chdir(args.cwd)
    except OSError:
        pass
    sys.path[:] = args.sys_path
    threading.Thread(target=_watch_control, args=(args.control, stop), daemon=True, name="nbbatch-control").start()
    return stop


def _coordinator(args: WorkerArgs) -> Coordinator:
    """Join the workers' gloo group (several workers) or stand alone (one)."""
    import torch

    from nbbatch._worker.collective import SoloCoordinator, TorchCoordinator
    from nbbatch._worker.distributed import GROUP_TIMEOUT

    if args.world_size == 1:
        return SoloCoordinator()
    import torch.distributed as dist

    if torch.cuda.is_available() and torch.cuda.device_count() > args.rank:
        torch.cuda.set_device(args.rank)
    host, port = args.master
    dist.init_process_group(
        "gloo", init_method=f"tcp://{host}:{port}", rank=args.rank, world_size=args.world_size, timeout=GROUP_TIMEOUT
    )
    return TorchCoordinator()


def _run(args: WorkerArgs, sink: PipeSink, stop: threading.Event) -> Status:
    """Load the spec, join the group and run the batch loop; a fatal error is reported before dying."""
    # Imported here, after the environment is the launcher's (spawn start method: torch reads it at import).
    import torch

    from nbbatch._worker.loop import failure, run_loop

    torch.set_num_threads(args.threads)
    try:
        spec = cloudpickle.loads(args.payload)
        return run_loop(spec, args.rank, args.rank, _coordinator(args), sink, stop.is_set)
    except BaseException as exc:  # report anything, even unpickling errors, before dying
        try:
            sink.emit(failure(args.rank, exc))
        except Exception:  # the launcher is gone: nobody to tell
            pass
        return Status.FAILED


def worker_main(args: WorkerArgs) -> None:
    """Run one local worker; the exit code is `EXIT_OK` when done or preempted and `EXIT_FAILED` otherwise."""
    stop = _install(args)
    try:
        status = _run(args, PipeSink(args.events), stop)
    finally:
        try:
            args.events.close()
        except OSError:
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_OK if status in (Status.DONE, Status.PREEMPTED) else EXIT_FAILED)
