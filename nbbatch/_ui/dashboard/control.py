"""The dashboard's Stop and Resume actions.

Stop writes the run's stop file (`Run.stop`); the live run preempts at its next checkpoint.
Resume starts ``python -m nbbatch resume NAME --store PATH`` as a detached process, for runs the
CLI started (``runs.launch`` records how to import the processor and dataset again). Runs started
from Python or a notebook cannot be re-created from here; `resume_blocker` says why. Must not
import Panel, ``_launch`` or ``_worker``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

from nbbatch._run import Run

__all__ = ["can_resume", "resume", "resume_blocker", "resume_command", "resuming", "stop"]

_STOPPABLE = ("running",)
_RESUMABLE = ("failed", "preempted")
_children: dict[str, subprocess.Popen[bytes]] = {}
_lock = threading.Lock()


def stop(store: str, run_id: str) -> str:
    """Ask the live run to preempt at its next checkpoint; returns a message for the user."""
    Run(store, run_id).stop()
    return "Stop requested: the run stops at its next checkpoint and can be resumed later."


def resume_blocker(detail: dict[str, Any]) -> str | None:
    """Why the run cannot be resumed from the dashboard now, or None if it can."""
    status = detail.get("status")
    name = detail.get("name")
    if status not in _RESUMABLE:
        return None if status == "running" else f"run {name!r} is {status}; only failed or preempted runs resume"
    launch = detail.get("launch") or {}
    if not launch.get("target") or not launch.get("dataset"):
        return (
            f"run {name!r} was defined in a notebook or script (it has no launch info), so the dashboard "
            f"cannot re-create its processor; resume it there with `torch_batch_process(..., run_name={name!r})`"
        )
    if resuming(str(detail.get("run_id"))):
        return f"a resume of run {name!r} is starting"
    return None


def can_resume(detail: dict[str, Any]) -> bool:
    """Resumable from here: failed or preempted, with launch info, and not being resumed already."""
    return detail.get("status") in _RESUMABLE and resume_blocker(detail) is None


def resume_command(store: str, name: str) -> list[str]:
    """The command the Resume button runs (the same as typing ``nbbatch resume``)."""
    return [sys.executable, "-m", "nbbatch", "resume", name, "--store", os.path.abspath(store), "--no-progress"]


def resuming(run_id: str) -> bool:
    """Whether a resume this process started for ``run_id`` is still going."""
    with _lock:
        child = _children.get(run_id)
        if child is None:
            return False
        if child.poll() is None:
            return True
        del _children[run_id]  # reaped: no zombie left behind
        return False


def resume(store: str, detail: dict[str, Any]) -> str:
    """Start ``nbbatch resume`` for the run in a detached process; returns a message for the user.

    Raises:
        ValueError: the run cannot be resumed from here (the message says why and what to do).
    """
    blocker = resume_blocker(detail)
    if blocker is not None or detail.get("status") not in _RESUMABLE:
        raise ValueError(blocker or f"run {detail.get('name')!r} cannot be resumed now")
    launch = detail.get("launch") or {}
    cwd = launch.get("cwd") if launch.get("cwd") and os.path.isdir(launch["cwd"]) else os.path.dirname(
        os.path.abspath(store)
    )
    log_dir = str(detail.get("output_dir") or os.path.dirname(os.path.abspath(store)))
    os.makedirs(log_dir, exist_ok=True)
    log_path = os.path.join(log_dir, f"resume-attempt{int(detail.get('attempt') or 0) + 1}.log")
    with open(log_path, "ab") as log:
        child = subprocess.Popen(
            resume_command(store, str(detail["name"])), cwd=cwd, stdin=subprocess.DEVNULL, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,  # outlives the dashboard, ignores its Ctrl-C
        )
    with _lock:
        _children[str(detail["run_id"])] = child
    return f"Resuming run {detail['name']!r} (pid {child.pid}); its log is `{log_path}`."
