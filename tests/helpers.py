"""Shared test helpers: polling with a deadline, the processes of a run, reading a run's row, the
``nbbatch`` command, a tiny disk, exactly-once checks, and the shared processor pieces.

Importable as ``helpers`` from any test (``tests/conftest.py`` puts this folder on ``sys.path``).
The processes of a run are found by an environment tag, not by parentage: a worker whose parent
died is re-parented to init, and must still count as "left behind".

`Sum`, `Summing` and `fill` live in ``integration/scripts/procs.py``, because scripts run as
subprocesses import them too; they are re-exported here so that tests have one place to import from.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import queue
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import psutil
import pytest

SCRIPTS = pathlib.Path(__file__).resolve().parent / "integration" / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))  # `procs`, `fault_procs` under the same module names as in the scripts

from procs import Sum, Summing, fill  # noqa: E402, F401 - re-exported: tests import them from here

TAG = "NBBATCH_TEST_TAG"
T = TypeVar("T")


def poll(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.02) -> T:
    """Call ``check`` every ``every`` seconds until it returns something truthy, and return that.

    Raises:
        AssertionError: ``timeout`` seconds passed first; the message says ``what`` was awaited.
            An `AssertionError`, not `pytest.fail`, so that it also reads right from a thread
            or a worker process.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def new_tag() -> str:
    """A value for ``$NBBATCH_TEST_TAG``: every process started with it (and their children) carries it."""
    return uuid.uuid4().hex


def tagged(tag: str) -> list[psutil.Process]:
    """Live (non-zombie) processes whose environment carries ``tag``, wherever they were re-parented."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TAG) == tag:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def in_session(sid: int) -> list[psutil.Process]:
    """Live processes in session or process group ``sid`` (a launcher started as a session leader)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if os.getsid(proc.pid) == sid or os.getpgid(proc.pid) == sid:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, ProcessLookupError, PermissionError):
            continue
    return found


def describe(procs: list[psutil.Process]) -> str:
    out = []
    for p in procs:
        with contextlib.suppress(psutil.Error):
            out.append(f"{p.pid} ppid={p.ppid()} {p.status()} {' '.join(p.cmdline())[:160]}")
    return "; ".join(out)


def leftovers(tag: str, sid: int | None, within: float = 5.0) -> list[psutil.Process]:
    """Processes of the run still alive ``within`` seconds from now (empty as soon as none is)."""
    deadline = time.monotonic() + within
    while True:
        alive = {p.pid: p for p in tagged(tag) + (in_session(sid) if sid is not None else [])}
        if not alive or time.monotonic() > deadline:
            return list(alive.values())
        time.sleep(0.05)


def worker_processes(pid: int | None = None) -> list[psutil.Process]:
    """Live workers of process ``pid``'s runs (default: this process): its descendants but its children.

    Its children are the server workers start from (a forkserver or a zygote) and multiprocessing's
    resource tracker, which may outlive a run; workers (and their DataLoader workers) are theirs.
    """
    try:
        root = psutil.Process(pid)
        descendants = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    found = []
    for proc in descendants:
        try:
            if proc.ppid() != root.pid and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def kill_tagged(tag: str) -> None:
    """Clean-up after a failed test: SIGKILL whatever still carries ``tag``."""
    for proc in tagged(tag):
        with contextlib.suppress(psutil.Error):
            proc.kill()


def run_summary(store: str | pathlib.Path, name: str) -> dict[str, Any]:
    """The run's row plus counts as readers report it, through a short read-only connection."""
    from nbbatch._store import reader

    with reader.reading(str(store)) as con:
        return reader.run_summary(con, name)


def summary(store: str | pathlib.Path, name: str) -> dict[str, Any] | None:
    """`run_summary`, or None while the store or the run's row is not there yet (a run still starting)."""
    from nbbatch import RunNotFound, StoreError

    try:
        return run_summary(store, name)
    except (StoreError, RunNotFound):
        return None


def committed(store: str | pathlib.Path, name: str) -> int:
    """The run's committed batches; 0 while the store or the run's row is not there yet."""
    row = summary(store, name)
    return int(row["committed_batches"]) if row else 0


def nbbatch_cli(*args: str, cwd: str | pathlib.Path | None = None, env: dict[str, str] | None = None,
                timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m nbbatch ARGS`` in a subprocess, its output captured; ``env`` adds to this process's."""
    return subprocess.run([sys.executable, "-m", "nbbatch", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def run_cell(client: Any, code: str, timeout: float = 120) -> list[dict[str, Any]]:
    """Execute ``code`` through a Jupyter kernel client; the cell's iopub messages until the kernel is idle.

    Raises:
        TimeoutError: no message came for ``timeout`` seconds from the start.
    """
    msg_id = client.execute(code)
    outputs = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(code) from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return outputs
        outputs.append(msg)


def stream_text(messages: list[dict[str, Any]]) -> str:
    """What a cell printed (its ``stream`` messages), from `run_cell`'s messages."""
    return "".join(m["content"].get("text", "") for m in messages if m["msg_type"] == "stream")


@contextlib.contextmanager
def tiny_disk(where: pathlib.Path, size: str) -> Iterator[pathlib.Path]:
    """A tmpfs of ``size`` mounted at ``where`` (skips the test where mounting is not allowed)."""
    where.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs to simulate a full disk: {done.stderr.strip() or done.returncode}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def check_exactly_once(store: str, name: str, n: int, batch_size: int) -> Any:
    """The run is done, holds samples 0..n-1 exactly once, and its reducers cover all of them."""
    import nbbatch

    run = nbbatch.open_run(name, store=store)
    assert run.status == "done", (run.status, run.error)
    rows = run.sql(
        "SELECT count(*), count(DISTINCT sample_index), min(sample_index), max(sample_index), "
        "count(*) FILTER (WHERE value = 3 * sample_index AND vector[1] = sample_index "
        "AND vector[8] = sample_index + 7) FROM outputs"
    ).fetchall()
    assert rows == [(n, n, 0, n - 1, n)], f"every sample exactly once with its own outputs: {rows}"
    batches = sorted(g for (g,) in run.batches().project("global_batch").fetchall())
    assert batches == list(range(-(-n // batch_size))), "every global batch committed once"
    assert run.reduced_metrics == {"sum": sum(range(n)), "order": list(range(n))}, run.reduced_metrics
    return run


def committed_unique(store: str, name: str) -> int:
    """Committed rows of a stopped run, checking that no sample is stored twice."""
    import nbbatch

    run = nbbatch.open_run(name, store=store)
    if run.counts["committed_batches"] == 0:
        return 0
    (total, distinct), = run.sql("SELECT count(*), count(DISTINCT sample_index) FROM outputs").fetchall()
    assert total == distinct, f"{total - distinct} samples stored twice before the resume"
    return int(total)
