"""The local launcher: start N worker processes, stream their events into the store, watch them.

Workers come from a forkserver that preloads torch (a fresh worker costs ~10 ms after the first
run instead of ~2 s for spawn, and never inherits the parent's OpenMP threads or CUDA state, which
make ``fork`` hang). Each worker has its own event pipe and a control pipe; the launcher is the
store's only writer.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

import cloudpickle

from nbbatch._errors import NbbatchError, RunFailed, StoreError, WorkerDied, WorkerFailed
from nbbatch._events import BatchFailed
from nbbatch._plan import Sharding
from nbbatch._progress import Reporter
from nbbatch._store.control import stop_file
from nbbatch._store.writer import RunRecord, StoreWriter
from nbbatch._launch.forkserver import context, ensure_started
from nbbatch._launch.supervisor import Supervisor
from nbbatch._launch.workers import WorkerProcess, kill_all, shut_down
from nbbatch._worker.entry import worker_main
from nbbatch._worker.loop import WorkerSpec

__all__ = ["Outcome", "default_threads", "launch_local"]

logger = logging.getLogger("nbbatch")

FLUSH_SECONDS = 0.5


@dataclass
class Outcome:
    """How an attempt ended; ``error`` is raised by the caller after the store is updated."""

    status: str
    reduced: dict[str, Any] | None
    error: BaseException | None = None
    interrupted_by: int | None = None
    used_upload_path: bool = False


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


def _free_port() -> int:
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


class _Signals:
    """Counts SIGINT/SIGTERM while a run is live (main thread only); restores handlers on exit."""

    def __init__(self) -> None:
        self.count = 0
        self.last: int | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.count += 1
        self.last = signum

    @contextmanager
    def installed(self) -> Iterator[_Signals]:
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _describe_failure(event: BatchFailed, name: str) -> str:
    if event.global_batch is None:
        where = f"worker rank {event.rank} failed outside a batch"
    else:
        idx = event.indices
        span = f"{idx[0]}..{idx[-1]}" if idx else "none"
        where = (
            f"worker rank {event.rank} failed in process_batch at batch_idx {event.batch_idx} "
            f"(global batch {event.global_batch}, dataset indices {span})"
        )
    return (
        f"{where}: {event.exc_type}: {event.message}. Run {name!r} is marked failed; fix the cause and "
        f"resume it with `run_name={name!r}` (committed batches are kept)"
    )


def launch_local(
    spec: WorkerSpec,
    record: RunRecord,
    sharding: Sharding,
    writer: StoreWriter,
    reporter: Reporter,
    *,
    threads: int | None = None,
    batch_timeout: float | None = None,
    on_start: Callable[[list[int]], None] | None = None,
) -> Outcome:
    """Run one attempt with ``sharding.world_size`` local worker processes."""
    world = sharding.world_size
    ctx = context()
    payload = cloudpickle.dumps(spec)
    port = _free_port()
    threads = threads or default_threads(world)
    procs: list[WorkerProcess] = []
    conns: dict[Connection, int] = {}
    controls: list[Connection] = []
    sup = Supervisor(record, sharding)
    stop_path = stop_file(writer.path, record.run_id)
    signals = _Signals()
    # Counted from here: a SIGTERM while workers start still ends the run preempted, not killed.
    with signals.installed():
        try:
            # The first start of a fresh interpreter waits for the forkserver to import torch (seconds).
            reporter.update(sup.snapshot("running"))
            ensure_started()
            for rank in range(world):
                procs.append(_start(ctx, rank, world, payload, port, threads, record.name, conns, controls))
            if on_start is not None:
                on_start([p.pid for p in procs])
            return _watch(sup, procs, conns, controls, writer, reporter, signals, stop_path, batch_timeout)
        finally:
            for control in controls:
                with suppress(OSError):
                    control.close()  # end-of-file tells a worker still running to leave
            shut_down(procs)
            for conn in conns:
                conn.close()
            with suppress(FileNotFoundError):
                os.unlink(stop_path)


def _start(ctx: Any, rank: int, world: int, payload: bytes, port: int, threads: int, name: str,
           conns: dict[Connection, int], controls: list[Connection]) -> WorkerProcess:
    """Start worker ``rank`` with its event pipe (into ``conns``) and control pipe (into ``controls``)."""
    recv, send = ctx.Pipe(duplex=False)
    ctrl_recv, ctrl_send = ctx.Pipe(duplex=False)
    proc = ctx.Process(
        target=worker_main,
        args=(rank, world, payload, send, ctrl_recv, ("127.0.0.1", port), threads, dict(os.environ),
              os.getcwd(), list(sys.path)),
        name=f"nbbatch-{name}-rank{rank}",
    )
    conns[recv] = rank
    controls.append(ctrl_send)
    with _main_not_reimported():
        proc.start()
    send.close()
    ctrl_recv.close()
    return WorkerProcess(proc)


def _watch(
    sup: Supervisor,
    procs: list[WorkerProcess],
    conns: dict[Connection, int],
    controls: list[Connection],
    writer: StoreWriter,
    reporter: Reporter,
    signals: _Signals,
    stop_path: str,
    batch_timeout: float | None,
) -> Outcome:
    record = sup.record
    open_conns = dict(conns)
    exited: dict[int, int | None] = {}
    stop_sent = False
    next_flush = time.monotonic() + FLUSH_SECONDS
    error: BaseException | None = None
    hard_stop = False
    sentinels = {p.sentinel: rank for rank, p in enumerate(procs)}
    while True:
        waitables: list[Any] = list(open_conns) + [s for s, r in sentinels.items() if r not in exited]
        try:
            ready = wait(waitables, timeout=0.1) if waitables else []
        except KeyboardInterrupt:  # no handler installed (not the main thread)
            signals.count += 1
            signals.last = signal.SIGINT
            ready = []
        for obj in ready:
            if obj in open_conns:
                _drain(obj, open_conns, sup)
        for obj in ready:
            if obj in sentinels and sentinels[obj] not in exited:
                rank = sentinels[obj]
                exited[rank] = procs[rank].exitcode()
        # A worker that exited without a closing event died (signal, OOM killer, os._exit).
        for rank, code in exited.items():
            if rank not in sup.finished and sup.fatal is None and error is None:
                conn = next((c for c, r in open_conns.items() if r == rank), None)
                if conn is not None:
                    _drain(conn, open_conns, sup)
                    if sup.fatal is not None or rank in sup.finished:
                        continue
                error = _died(rank, code, sup)
        if sup.fatal is not None and error is None and sup.fatal.global_batch is None:
            # A peer's collective breaks when a worker dies; name the dead worker, not the peer.
            dead = _wait_for_death(procs, exited, sentinels, seconds=2.0)
            if dead is not None:
                error = _died(dead[0], dead[1], sup)
        if sup.fatal is not None and error is None:
            error = WorkerFailed(
                _describe_failure(sup.fatal, record.name),
                rank=sup.fatal.rank, batch_idx=sup.fatal.batch_idx, global_batch=sup.fatal.global_batch,
                indices=sup.fatal.indices, remote_traceback=sup.fatal.traceback, run_name=record.name,
            )
        if sup.too_many_failures and error is None and len(sup.finished) == len(procs):
            error = RunFailed(
                f"run {record.name!r} skipped more failing batches than max_failures allows; see "
                f"`nbbatch.open_run({record.name!r}).errors()` and resume with `run_name={record.name!r}`"
            )
        if batch_timeout is not None and error is None:
            hung = sup.hung(batch_timeout)
            if hung is not None:
                rank, g, k, secs = hung
                error = WorkerFailed(
                    f"worker rank {rank} spent {secs:.0f}s in process_batch at batch_idx {k} (global batch {g}), "
                    f"over batch_timeout={batch_timeout}; run {record.name!r} is marked failed, resume it with "
                    f"`run_name={record.name!r}`",
                    rank=rank, batch_idx=k, global_batch=g, indices=sup.sharding.indices(g), run_name=record.name,
                )
        if error is not None:
            kill_all(procs)
            break
        if not stop_sent and (signals.count or _exists(stop_path)):
            stop_sent = True
            logger.warning("nbbatch: stopping run %r at its next checkpoint (interrupt again to stop now)", record.name)
            for control in controls:
                try:
                    control.send("stop")
                except OSError:
                    pass
        if signals.count >= 2:
            hard_stop = True
            kill_all(procs)
            break
        if len(exited) == len(procs) and not open_conns:
            break
        if time.monotonic() >= next_flush:
            next_flush = time.monotonic() + FLUSH_SECONDS
            try:
                writer.commit(record, sup.take_commit())
            except StoreError as exc:
                error = exc
                kill_all(procs)
                break
            reporter.update(sup.snapshot("running"))
    # Final flush: commit every complete step and the error rows.
    try:
        writer.commit(record, sup.take_commit())
    except StoreError as exc:
        error = error or exc
    if error is not None:
        status = "failed"
    elif hard_stop or (stop_sent and all(s == "preempted" for s in sup.finished.values())):
        status = "preempted"
    elif sup.finished and all(s == "done" for s in sup.finished.values()) and len(sup.finished) == len(procs):
        status = "done"
    elif all(s == "preempted" for s in sup.finished.values()) and sup.finished:
        status = "preempted"
    else:
        status = "failed"
        error = NbbatchError(f"run {record.name!r} ended in an unexpected state {sup.finished}; resume it with `run_name={record.name!r}`")
    reporter_status = status
    try:
        reporter.close(sup.snapshot(reporter_status))
    except Exception:  # a broken display must not lose the outcome
        logger.exception("progress display failed")
    interrupted = signals.last if (signals.count and status == "preempted") else None
    return Outcome(status, sup.reduced, error, interrupted, sup.used_upload_path)


def _wait_for_death(procs: list[WorkerProcess], exited: dict[int, int | None], sentinels: dict[Any, int],
                    seconds: float) -> tuple[int, int] | None:
    """``(rank, exit code)`` of a worker killed by a signal within ``seconds``, if any."""
    deadline = time.monotonic() + seconds
    while True:
        for rank, proc in enumerate(procs):
            code = proc.exitcode()
            if code is not None and code < 0:
                exited[rank] = code
                return rank, code
        if time.monotonic() >= deadline:
            return None
        wait([s for s, r in sentinels.items() if r not in exited], timeout=0.1)


def _drain(conn: Connection, open_conns: dict[Connection, int], sup: Supervisor) -> None:
    try:
        while conn.poll():
            sup.handle(conn.recv())
    except (EOFError, OSError):
        del open_conns[conn]


def _exists(path: str) -> bool:
    return os.path.exists(path)


def _died(rank: int, code: int | None, sup: Supervisor) -> WorkerDied:
    if code is None:
        how = "exited without reporting an error (exit code unknown: the forkserver that started it is gone)"
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
        + (f" while processing batch_idx {current[1]} (global batch {current[0]})" if current else "")
        + f". Run {name!r} is marked failed; resume it with `run_name={name!r}`",
        rank=rank,
        batch_idx=current[1] if current else None,
        global_batch=current[0] if current else None,
        indices=sup.sharding.indices(current[0]) if current else (),
        run_name=name,
    )


