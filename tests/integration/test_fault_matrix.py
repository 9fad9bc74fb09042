"""The fault matrix: every way a run can end gives the right status and exit code, leaves no process
behind, and resumes to every sample stored exactly once with reducers over the whole dataset.

Each case starts one job in a subprocess of its own session (as a terminal or a scheduler does),
waits until the job reaches the fault's trigger point (the processor writes a marker file and
blocks until the test releases it, or injects the fault itself; see scripts/fault_procs.py), then
delivers the fault. It then checks the run's status, the exit code, that no process carrying the
job's environment tag is alive 5 s after the job ended, and resumes the run in this process (its
forkserver stays warm) with one worker, checking exactly-once outputs and reducers.

Launchers: ``local`` (``python fault_job.py``, 2 workers), ``cli`` (``nbbatch run``, the documented
exit codes, for the signal faults) and ``torchrun`` (``--standalone --nproc-per-node 2``).
By default each fault runs at one trigger point per launcher; ``NBBATCH_FULL_MATRIX=1`` (or
``-m matrix_full``) adds the other points.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import pytest

import helpers
import nbbatch
from fault_procs import FAULT_ENV, FaultJob, numbers
from nbbatch import torch_batch_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SCRIPTS = helpers.SCRIPTS
JOB = SCRIPTS / "fault_job.py"
PROCS = SCRIPTS / "fault_procs.py"
WORKERS, BS, INTERVAL, ITERATIONS = 2, 2, 3, 30  # per-worker iterations: 10 checkpoints
N = WORKERS * BS * ITERATIONS
CHECKPOINTS = ITERATIONS // INTERVAL
SLOW = 0.1  # seconds per batch after a stop request: the run must end at a checkpoint, not run out
TIMEOUT = 2.0  # batch_timeout of the hang case (a normal batch takes milliseconds)

# Where each kind of fault fires, per trigger point: (hook, batch_idx or checkpoint number).
BATCH_OR_CHECKPOINT = {"early": ("process_batch", 0), "mid": ("process_batch", INTERVAL + 1),
                       "checkpoint": ("on_checkpoint_start", 2)}
IN_BATCH = {"early": ("process_batch", 0), "mid": ("process_batch", INTERVAL + 1),
            "checkpoint": ("process_batch", 2 * INTERVAL - 1)}  # the last batch before a checkpoint
IN_CHECKPOINT = {"early": ("on_checkpoint_start", 1), "mid": ("on_checkpoint_start", CHECKPOINTS // 2),
                 "checkpoint": ("on_checkpoint_start", CHECKPOINTS)}


@dataclass(frozen=True)
class Fault:
    """One row of the matrix: what is injected, how the test delivers it, and what must follow."""

    action: str  # wait (the test delivers `deliver`), raise, hang, fill, flush_kill
    status: str
    points: dict[str, tuple[str, int | None]] = field(default_factory=lambda: dict(BATCH_OR_CHECKPOINT))
    default: str = "mid"
    deliver: str | None = None
    rank: int = 0
    launchers: tuple[str, ...] = ("local", "torchrun")
    cli_default: bool = False  # `nbbatch run` by default too (its documented exit codes 130/143)


FAULTS = {
    "sigint-group": Fault("wait", "preempted", deliver="sigint-group", default="early",
                          launchers=("local", "cli", "torchrun"), cli_default=True),
    "sigterm-launcher": Fault("wait", "preempted", deliver="sigterm-launcher", default="mid",
                              launchers=("local", "cli", "torchrun")),
    "sigterm-group": Fault("wait", "preempted", deliver="sigterm-group", default="checkpoint",
                           launchers=("local", "cli", "torchrun"), cli_default=True),
    "sigterm-all": Fault("wait", "preempted", deliver="sigterm-all", default="mid",
                         launchers=("local", "cli", "torchrun")),
    # Under torchrun the store's writer is rank 0: SIGKILLing it is the vanished launcher.
    "sigkill-launcher": Fault("wait", "interrupted", deliver="sigkill-launcher", default="checkpoint"),
    "sigkill-worker": Fault("wait", "failed", deliver="sigkill-waiter", rank=1, default="early"),
    "raise-process_batch": Fault("raise", "failed", points=dict(IN_BATCH), rank=1, default="checkpoint",
                                 launchers=("local", "cli", "torchrun")),
    "raise-init": Fault("raise", "failed", points={"early": ("__init__", None)}, rank=1, default="early"),
    "raise-on_checkpoint_start": Fault("raise", "failed", points=dict(IN_CHECKPOINT), rank=1, default="mid"),
    "raise-on_finish": Fault("raise", "failed", points={"checkpoint": ("on_finish", None)}, rank=1,
                             default="checkpoint"),
    "hang": Fault("hang", "failed", points=dict(IN_BATCH), rank=1, default="early"),
    "disk-full": Fault("fill", "failed", default="mid"),
    "flush-kill": Fault("flush_kill", "interrupted", points={p: ("flush", None) for p in ("early", "mid", "checkpoint")},
                        default="checkpoint"),
}


def cases() -> Iterator[Any]:
    for name, fault in FAULTS.items():
        for launcher in fault.launchers:
            for point in fault.points:
                default = point == fault.default and (launcher != "cli" or fault.cli_default)
                marks = [] if default else [pytest.mark.matrix_full]
                yield pytest.param(launcher, name, point, id=f"{launcher}-{name}-{point}", marks=marks)


def expected_exit(launcher: str, fault: Fault) -> int:
    """The exit code the README documents (plain scripts: Python's own for an uncaught KeyboardInterrupt)."""
    if fault.status == "interrupted":
        # The launcher was SIGKILLed; under torchrun, rank 0 was, and torchrun reports a failed child.
        return 1 if launcher == "torchrun" else -signal.SIGKILL
    if fault.status == "failed":
        return 1
    if launcher == "torchrun":
        # torchrun's own code: it forwards the signal to the ranks, waits for them (they commit and
        # exit), then re-raises it as SignalException and exits 1. The README documents no other.
        return 1
    if fault.deliver == "sigint-group":
        # `nbbatch run`: 130. A script ends with KeyboardInterrupt, which Python turns into death by
        # SIGINT (the shell's 130).
        return 130 if launcher == "cli" else -signal.SIGINT
    return 143


def command(launcher: str, store: pathlib.Path, name: str, batch_timeout: float | None) -> list[str]:
    job = ["--store", str(store), "--name", name, "--samples", str(N), "--batch-size", str(BS),
           "--interval", str(INTERVAL)]
    if batch_timeout is not None:
        job += ["--batch-timeout", str(batch_timeout)]
    if launcher == "local":
        return [sys.executable, str(JOB), *job, "--workers", str(WORKERS)]
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(WORKERS),
                str(JOB), *job]
    return [sys.executable, "-m", "nbbatch", "run", f"{PROCS}:FaultJob", "--dataset", f"{PROCS}:numbers",
            "--dataset-arg", f"n={N}", "--batch-size", str(BS), "--checkpoint-interval", str(INTERVAL),
            "--processes", str(WORKERS), "--name", name, "--store", str(store), "--no-progress"]


def deliver(how: str, launcher: str, proc: subprocess.Popen[bytes], waiter: int, tag: str) -> None:
    """Send the fault: signals to the launcher, its group, every process of the run, or one process."""
    if how == "sigint-group":
        os.killpg(proc.pid, signal.SIGINT)
    elif how == "sigterm-launcher":
        os.kill(proc.pid, signal.SIGTERM)
    elif how == "sigterm-group":
        os.killpg(proc.pid, signal.SIGTERM)
    elif how == "sigterm-all":
        for p in helpers.tagged(tag):
            try:
                os.kill(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    elif how == "sigkill-launcher":
        os.kill(waiter if launcher == "torchrun" else proc.pid, signal.SIGKILL)
    elif how == "sigkill-waiter":
        os.kill(waiter, signal.SIGKILL)
    else:  # pragma: no cover
        raise ValueError(how)


def read_marker(path: pathlib.Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def resume(store: str, name: str) -> nbbatch.Run:
    """Resume in this process, with one worker: the plan is keyed on global batches, not on workers."""
    return torch_batch_process(FaultJob, numbers(N), batch_size=BS, checkpoint_interval=INTERVAL, num_processes=1,
                               store=store, run_name=name, progress=False)


def status_of(store: str, name: str) -> str:
    """The run's status once `Run.wait()` returns (it must, for every status but `running`)."""
    try:
        return str(nbbatch.open_run(name, store=store).wait(timeout=10).status)
    except Exception as exc:  # the fact goes into the failure message
        return f"<{type(exc).__name__}: {exc}>"


def fault_spec(fault: Fault, point: str, marks: pathlib.Path, where: pathlib.Path) -> dict[str, Any]:
    """``$NBBATCH_FAULT`` for one case (see fault_procs.py)."""
    if fault.action == "flush_kill":
        return {"flush_kill": point, "dir": str(marks), "pace": 0.4}  # a step per 1.2 s: flushes in between
    hook, at = fault.points[point]
    spec: dict[str, Any] = {"action": fault.action, "hook": hook, "at": at, "rank": fault.rank, "dir": str(marks)}
    if fault.action == "fill":
        spec["ballast"] = str(where / "ballast")
    if fault.action == "wait":
        spec["slow"] = SLOW
    return spec


def check_resume(fault: Fault, spec: dict[str, Any], store: str, name: str, facts: str) -> list[str]:
    """Resume here and check exactly-once; the problems found (an empty list when all is well)."""
    try:
        helpers.committed_unique(store, name)
        if fault.action == "fill":
            os.unlink(spec["ballast"])  # free the space; the resume does not fill it again
        started = time.monotonic()
        resumed = resume(store, name)
        print(f"{facts.splitlines()[0]} resumed in {time.monotonic() - started:.1f}s")
        assert resumed.status == "done", resumed.status
        helpers.check_exactly_once(store, name, N, BS)
        return []
    except Exception as exc:  # AssertionError included: reported with the rest
        return [f"resume: {type(exc).__name__}: {exc}"]


@pytest.mark.parametrize("launcher,fault_name,point", list(cases()))
def test_fault(tmp_path: pathlib.Path, launcher: str, fault_name: str, point: str) -> None:
    fault = FAULTS[fault_name]
    name = f"{fault_name}-{point}"
    marks = tmp_path / "marks"
    marks.mkdir()
    tag = helpers.new_tag()
    with ExitStack() as stack:
        stack.callback(helpers.kill_tagged, tag)
        where = tmp_path
        if fault.action == "fill":
            where = stack.enter_context(helpers.tiny_disk(tmp_path / "disk", "8m"))
            stack.callback(nbbatch._store.connection.close_all)  # release the file before the unmount
        spec = fault_spec(fault, point, marks, where)
        store = where / "s.duckdb"
        # NBBATCH_ABORT_GRACE: how long a torchrun rank stuck in user code (the hang) lingers.
        env = {**os.environ, FAULT_ENV: json.dumps(spec), helpers.TAG: tag, "OMP_NUM_THREADS": "1",
               "NBBATCH_STORE": "", "NBBATCH_ABORT_GRACE": "2"}
        out = stack.enter_context(open(tmp_path / "out.txt", "wb"))
        started = reached = time.monotonic()
        proc = subprocess.Popen(command(launcher, store, name, TIMEOUT if fault.action == "hang" else None),
                                cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        stack.callback(lambda: proc.poll() is None and proc.kill())
        if fault.deliver is not None:
            marker = marks / f"reached-{fault.rank}"
            waiter = helpers.poll(lambda: read_marker(marker), 120, f"the job to reach {spec['hook']}@{spec['at']}")
            reached = time.monotonic()
            deliver(fault.deliver, launcher, proc, waiter, tag)
            (marks / "go").touch()
        try:
            code = proc.wait(timeout=150)
        except subprocess.TimeoutExpired:
            code = None
        ended = time.monotonic()
        left = helpers.leftovers(tag, proc.pid, within=5.0)
        status = status_of(str(store), name)
        log = (tmp_path / "out.txt").read_text(errors="replace")
        facts = (f"[{launcher} {fault_name} @ {point}: status={status!r} exit={code}, trigger reached after "
                 f"{reached - started:.1f}s, ended {ended - reached:.1f}s later; "
                 f"alive 5 s later: {helpers.describe(left) or 'none'}]\n--- job output (tail) ---\n{log[-3000:]}")
        assert code is not None, f"the job did not end within 150 s {facts}"
        # Every check is made, and all that fail are reported together with the facts.
        problems = []
        if fault.action == "flush_kill" and not (marks / "reached-flush").exists():
            problems.append("the writer was never killed in a flush")
        if status != fault.status:
            problems.append(f"status {status!r}, expected {fault.status!r}")
        if code != expected_exit(launcher, fault):
            problems.append(f"exit code {code}, expected {expected_exit(launcher, fault)}")
        if left:
            problems.append(f"{len(left)} processes of the run alive 5 s after it ended")
        problems += check_resume(fault, spec, str(store), name, facts)
        assert not problems, f"{'; '.join(problems)} {facts}"
