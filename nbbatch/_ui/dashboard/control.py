"""The dashboard's Stop and Resume actions.

Stop writes the run's stop file (`Run.stop`); the live run preempts at its next checkpoint.
Resume starts ``python -m nbbatch resume --store PATH -- NAME`` as a detached process, for runs the
CLI started (``runs.launch`` records how to import the processor and dataset again). Runs started
from Python or a notebook cannot be re-created from here; `resume_blocker` says why. Nor can runs
whose launch info or reducer states this user did not sign (`trust_blocker`): the trust step is
``nbbatch trust`` in a terminal, never a button. Must not import Panel, ``_launch`` or ``_worker``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from typing import Any

from nbbatch._events import Status
from nbbatch._run import Run
from nbbatch._store.schema import outputs_folder, run_folder

__all__ = [
    "RESUMABLE", "STOPPABLE", "can_resume", "resume", "resume_blocker", "resume_command", "resuming", "stop",
    "trust_blocker",
]

#: Stop only reaches a live run; an interrupted one has no launcher left to read the stop file.
STOPPABLE = frozenset({Status.RUNNING})
RESUMABLE = frozenset(s for s in Status if s.resumable)  # failed, preempted, interrupted
_children: dict[str, subprocess.Popen[bytes]] = {}
_trust_cache: dict[tuple[Any, ...], tuple[str | None, dict[str, Any]]] = {}
_lock = threading.Lock()


def stop(store: str, run_id: str) -> str:
    """Ask the live run to preempt at its next checkpoint; returns a message for the user."""
    Run(store, run_id).stop()
    return "Stop requested: the run stops at its next checkpoint and can be resumed later."


def resume_blocker(detail: dict[str, Any], store: str | None = None) -> str | None:
    """Why the run cannot be resumed from the dashboard now, or None if it can.

    With ``store`` it also checks that this user signed the run's records (`trust_blocker`).
    """
    status = detail.get("status")
    name = detail.get("name")
    if status not in RESUMABLE:
        if status in STOPPABLE:
            return None
        return f"run {name!r} is {status}; only failed, preempted or interrupted runs resume"
    launch = detail.get("launch") or {}
    if not launch.get("target") or not (launch.get("dataset") or launch.get("table")):  # --dataset or --table
        return (
            f"run {name!r} was defined in a notebook or script (it has no launch info), so the dashboard "
            f"cannot re-create its processor; resume it there with `torch_batch_process(..., run_name={name!r})`"
        )
    if resuming(str(detail.get("run_id"))):
        return f"a resume of run {name!r} is starting"
    return trust_blocker(store, detail)[0] if store is not None else None


def can_resume(detail: dict[str, Any], store: str | None = None) -> bool:
    """Resumable from here: failed, preempted or interrupted, with launch info, and not being resumed already."""
    return detail.get("status") in RESUMABLE and resume_blocker(detail, store) is None


def trust_blocker(store: str, detail: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """Why a resume would refuse the run's records (not signed by this user), or None; and the launch as verified.

    Checked again on each click and by the ``nbbatch resume`` it starts; cached per state of the
    store file, since the buttons ask on every refresh.
    """
    path = os.path.abspath(store)
    key = (path, str(detail.get("run_id")), *(_mtime(path + suffix) for suffix in ("", ".wal")))
    if key not in _trust_cache:
        _trust_cache.clear()  # one entry: the run on screen
        _trust_cache[key] = _check_trust(path, str(detail.get("run_id")), str(detail.get("name")))
    return _trust_cache[key]


def _mtime(path: str) -> int:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def _check_trust(store: str, run_id: str, name: str) -> tuple[str | None, dict[str, Any]]:
    from nbbatch._errors import StoreError
    from nbbatch._store import reader, trust
    from nbbatch._store.secret import load_secret

    try:
        secret = load_secret(create=False)
        with reader.reading(store) as con:
            records = trust.read_records(con, run_id)
    except StoreError as exc:
        return f"cannot check that you signed run {name!r}: {exc}", {}
    bad = trust.untrusted(records, run_id, secret)
    launch = next((r.value for r in records if r.kind == "launch" and isinstance(r.value, dict)), {})
    return (trust.refusal(name, store, bad, secret) if bad else None), launch


def resume_command(store: str, name: str) -> list[str]:
    """The command the Resume button runs (the same as typing ``nbbatch resume``).

    ``--`` ends the options, so a name that starts with ``-`` (stored by an older nbbatch, or
    planted) is read as the run's name, never as an option.
    """
    return [sys.executable, "-m", "nbbatch", "resume", "--store", os.path.abspath(store), "--no-progress", "--", name]


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
    if blocker is not None or detail.get("status") not in RESUMABLE:
        raise ValueError(blocker or f"run {detail.get('name')!r} cannot be resumed now")
    _trust_cache.clear()  # a click checks the store as it is now
    untrusted, launch = trust_blocker(store, detail)  # the launch as signed, not as the page last read it
    if untrusted is not None:
        raise ValueError(untrusted)
    cwd = launch.get("cwd") if launch.get("cwd") and os.path.isdir(launch["cwd"]) else os.path.dirname(
        os.path.abspath(store)
    )
    # Inside the store's outputs folder whatever `output_dir` the store holds (it may come from elsewhere).
    log_dir = run_folder(outputs_folder(store), str(detail["run_id"]), detail.get("output_dir"))
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
