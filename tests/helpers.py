"""Shared test helpers: polling with a deadline, the processes of a run, a tiny disk, exactly-once checks.

Importable as ``helpers`` from any test (``tests/conftest.py`` puts this folder on ``sys.path``).
The processes of a run are found by an environment tag, not by parentage: a worker whose parent
died is re-parented to init, and must still count as "left behind".
"""

from __future__ import annotations

import contextlib
import os
import pathlib
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
    sys.path.insert(0, str(SCRIPTS))  # `fault_procs` under the same module name as in the scripts

TAG = "NBBATCH_TEST_TAG"
T = TypeVar("T")


def poll(check: Callable[[], T | None], timeout: float, what: str, every: float = 0.02) -> T:
    """Call ``check`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
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


def kill_tagged(tag: str) -> None:
    """Clean-up after a failed test: SIGKILL whatever still carries ``tag``."""
    for proc in tagged(tag):
        with contextlib.suppress(psutil.Error):
            proc.kill()


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
