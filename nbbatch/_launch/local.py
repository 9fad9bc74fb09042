"""The local transport: N worker processes, their events read from pipes.

Workers are forked from a zygote (a copy of the caller forked from a fresh thread, where torch is
already imported: `nbbatch._launch.zygote`) or, where forking the caller is unsafe (a Jupyter
kernel, CUDA initialised, other threads alive), from a forkserver that preloads torch. Either way
a worker never inherits OpenMP threads or CUDA state, which make a plain ``fork`` hang. Each worker
has its own event pipe and a control pipe. This module only moves events and watches processes;
the run's lifecycle (commits, status, errors) is `Lifecycle`'s.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

import cloudpickle

from nbbatch._errors import StoreError, WorkerDied
from nbbatch._events import Control, Status
from nbbatch._launch.attempt import attempt_spec
from nbbatch._launch.forkserver import context, ensure_started, release
from nbbatch._launch.lifecycle import FLUSH_SECONDS, Lifecycle, Signals, begin, conclude
from nbbatch._launch.supervisor import Supervisor
from nbbatch._launch.workers import WorkerProcess, kill_all, shut_down
from nbbatch._progress import Reporter
from nbbatch._run import Run
from nbbatch._store.records import RunSpec
from nbbatch._worker.entry import WorkerArgs, worker_main

if TYPE_CHECKING:
    from nbbatch._options import RunConfig

__all__ = ["default_threads", "free_port", "run_local"]

logger = logging.getLogger("nbbatch")

WAIT_SECONDS = 0.1  # how long one wait for pipes and process exits blocks
DEATH_WAIT_SECONDS = 2.0  # how long a broken collective waits for the worker that died to be seen


@contextmanager
def _main_not_reimported() -> Iterator[None]:
    """Hide ``__main__``'s file and spec while workers start, so they never re-run the script.

    multiprocessing re-imports the parent's main module in every child; a Determined script
    without an ``if __name__ == "__main__":`` guard would then launch itself recursively, and a
    guarded one would still repeat its top-level imports in each worker. Processor classes from
    ``__main__`` travel by value (cloudpickle), so workers do not need the module.
    """
    main = sys.modules.get("__main__")
    saved = {attr: getattr(main, attr) for attr in ("__file__", "__spec__") if main is not None and hasattr(main, attr)}
    try:
        if "__file__" in saved:
            del main.__file__  # type: ignore[union-attr]
        if "__spec__" in saved:
            main.__spec__ = None  # type: ignore[union-attr]
        yield
    finally:
        for attr, value in saved.items():
            setattr(main, attr, value)


def free_port() -> int:
    """A TCP port free on loopback now (for the workers' process group)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def default_threads(local_workers: int) -> int:
    """Intra-op threads per worker: the machine's cores shared evenly."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, local_workers))


def run_local(config: RunConfig, spec: RunSpec, user: bytes, reporter: Reporter) -> Run:
    """Create or resume the run, run one attempt on ``config.num_processes`` local workers, conclude."""
    # The zygote is forked before the store opens: the store's warm-up thread would make a fork
    # unsafe (`zygote.unusable`), and the call would fall back to the slower forkserver.
    ensure_started()
    try:
        return _run_local(config, spec, user, reporter)
    finally:
        release()  # this call's zygote leaves now that its workers are gone


def _run_local(config: RunConfig, spec: RunSpec, user: bytes, reporter: Reporter) -> Run:
    writer, record = begin(config.store, spec)
    if record.status == Status.DONE:
        return Run(config.store, record.run_id)
    try:
        sharding, worker_spec = attempt_spec(config, spec.dataset_len, config.num_processes, user, record)
        life = Lifecycle(record, sharding, writer, reporter, config.batch_timeout)
        signals = Signals()
        # Counted from here: a SIGTERM while workers start still ends the run preempted, not killed.
        with signals.installed():
            try:
                _attempt(life, signals, cloudpickle.dumps(worker_spec), config.num_processes)
                status, error = life.finish(*life.decide(config.num_processes))
            except BaseException as exc:
                life.finish(Status.FAILED, exc)
                raise
            finally:
                life.close()
    finally:
        writer.close()
    conclude(status, error, signals, record.name)
    return Run(config.store, record.run_id)


def _attempt(life: Lifecycle, signals: Signals, payload: bytes, world: int) -> None:
    """Start the workers, move their events into ``life`` until they are gone, then stop them all."""
    workers = _Workers(life.sup)
    try:
        life.report()  # "starting N workers" while they start
        workers.start(payload, world, life.name)
        _watch(life, workers, signals)
    finally:
        workers.close()


def _watch(life: Lifecycle, workers: _Workers, signals: Signals) -> None:
    next_flush = time.monotonic() + FLUSH_SECONDS
    while True:
        try:
            workers.pump()
        except KeyboardInterrupt:  # no handler installed (not the main thread)
            signals.note(signal.SIGINT)
        _check_workers(life, workers)
        if life.check() is not None:
            workers.kill()
            return
        if life.wants_stop(signals):
            workers.send(Control.STOP)
        if signals.count >= 2:
            life.hard_stop = True
            workers.kill()
            return
        if workers.all_gone():
            return
        if time.monotonic() >= next_flush:
            next_flush = time.monotonic() + FLUSH_SECONDS
            try:
                life.flush()
            except StoreError as exc:
                life.fail(exc)
                workers.kill()
                return


def _check_workers(life: Lifecycle, workers: _Workers) -> None:
    """Fail the run for a worker that exited without a closing event (signal, OOM killer, ``os._exit``)."""
    if life.error is not None:
        return
    dead = workers.died_silently()
    if dead is None and life.sup.fatal is not None and life.sup.fatal.global_batch is None:
        # A peer's collective breaks when a worker dies; name the dead worker, not the peer.
        dead = workers.killed_within(DEATH_WAIT_SECONDS)
    if dead is not None:
        life.fail(_died(dead[0], dead[1], life.sup))


class _Workers:
    """The worker processes of one attempt with their event and control pipes."""

    def __init__(self, sup: Supervisor) -> None:
        self.sup = sup
        self.procs: list[WorkerProcess] = []
        self.open: dict[Connection, int] = {}  # event pipes not at end-of-file yet, by rank
        self.controls: list[Connection] = []
        self.exited: dict[int, int | None] = {}

    def start(self, payload: bytes, world: int, name: str) -> None:
        """Start ``world`` workers, each with its own event pipe and control pipe."""
        ctx = context()
        port = free_port()
        threads = default_threads(world)
        for rank in range(world):
            recv, send = ctx.Pipe(duplex=False)
            ctrl_recv, ctrl_send = ctx.Pipe(duplex=False)
            args = WorkerArgs(rank, world, payload, send, ctrl_recv, ("127.0.0.1", port), threads,
                              dict(os.environ), os.getcwd(), list(sys.path))
            proc = ctx.Process(target=worker_main, args=(args,), name=f"nbbatch-{name}-rank{rank}")
            self.open[recv] = rank
            self.controls.append(ctrl_send)
            with _main_not_reimported():
                proc.start()
            send.close()
            ctrl_recv.close()
            self.procs.append(WorkerProcess(proc))

    def pump(self) -> None:
        """Wait briefly for events or exits; hand events to the Supervisor and note exits."""
        sentinels = {p.sentinel: rank for rank, p in enumerate(self.procs) if rank not in self.exited}
        waitables: list[Any] = [*self.open, *sentinels]
        ready = wait(waitables, timeout=WAIT_SECONDS) if waitables else []
        for obj in ready:
            if obj in self.open:
                self._drain(obj)
        for obj in ready:
            if obj in sentinels:
                self.exited[sentinels[obj]] = self.procs[sentinels[obj]].exitcode()

    def _drain(self, conn: Connection) -> None:
        try:
            while conn.poll():
                self.sup.handle(conn.recv())
        except (EOFError, OSError):
            del self.open[conn]
            conn.close()

    def died_silently(self) -> tuple[int, int | None] | None:
        """``(rank, exit code)`` of a worker that exited without its closing event, if any."""
        for rank, code in self.exited.items():
            if rank in self.sup.finished or self.sup.fatal is not None:
                continue
            conn = next((c for c, r in self.open.items() if r == rank), None)
            if conn is not None:
                self._drain(conn)  # its last events may still sit in the pipe
                if self.sup.fatal is not None or rank in self.sup.finished:
                    continue
            return rank, code
        return None

    def killed_within(self, seconds: float) -> tuple[int, int] | None:
        """``(rank, exit code)`` of a worker killed by a signal within ``seconds``, if any."""
        deadline = time.monotonic() + seconds
        while True:
            for rank, proc in enumerate(self.procs):
                code = proc.exitcode()
                if code is not None and code < 0:
                    self.exited[rank] = code
                    return rank, code
            if time.monotonic() >= deadline:
                return None
            wait([p.sentinel for r, p in enumerate(self.procs) if r not in self.exited], timeout=WAIT_SECONDS)

    def send(self, message: Control) -> None:
        """Send a control message to every worker still listening."""
        for control in self.controls:
            with suppress(OSError):
                control.send(message)

    def all_gone(self) -> bool:
        """Whether every worker exited and every event pipe reached its end."""
        return len(self.exited) == len(self.procs) and not self.open

    def kill(self) -> None:
        """SIGKILL every worker (after an error, or a second interrupt)."""
        kill_all(self.procs)

    def close(self) -> None:
        """Close the control pipes (end-of-file tells a worker still running to leave), reap, close."""
        for control in self.controls:
            with suppress(OSError):
                control.close()
        shut_down(self.procs)
        for conn in list(self.open):
            conn.close()


def _died(rank: int, code: int | None, sup: Supervisor) -> WorkerDied:
    if code is None:
        how = "exited without reporting an error (exit code unknown: the process server that started it is gone)"
    elif code < 0:
        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
        if code == -signal.SIGKILL:
            how += " (out of memory? `dmesg` tells)"
    else:
        how = f"exited with code {code} without reporting an error"
    worker = sup.workers[rank]
    current = worker.current
    name = sup.record.name
    return WorkerDied(
        f"worker rank {rank} {how}"
        + (f" while processing batch_idx {current.batch_idx} (global batch {current.global_batch})" if current else "")
        + f". Run {name!r} is marked failed; resume it with `run_name={name!r}`",
        rank=rank,
        batch_idx=current.batch_idx if current else None,
        global_batch=current.global_batch if current else None,
        indices=sup.sharding.indices(current.global_batch) if current else (),
        run_name=name,
    )


