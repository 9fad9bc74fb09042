"""The processor of the fault matrix and the exactly-once property test, with its fault injection.

`FaultJob` stores ``value = 3 * sample`` and an 8-float ``vector`` per sample, reduces a sum
(`procs.Sum`, a MetricReducer) and the samples in order (a function reducer; both from
`procs.Summing`), and injects one fault,
chosen by ``$NBBATCH_FAULT`` (JSON), at a deterministic point:

- ``hook``: ``__init__``, ``process_batch``, ``on_checkpoint_start`` or ``on_finish``;
- ``at``: the ``batch_idx`` (process_batch) or the 1-based checkpoint number (on_checkpoint_start);
- ``rank``: the rank that injects it;
- ``action``: ``raise``; ``wait`` (write ``<dir>/reached`` with this pid, then block until
  ``<dir>/go`` exists: the test signals or kills processes meanwhile); ``hang`` (block for good,
  for ``batch_timeout``); ``fill`` (fill the disk holding ``ballast``, then go on);
- ``slow``: seconds to sleep in every batch after the fault (so that a stop request lands long
  before the run could end), and ``pace``: seconds per batch before it.

``flush_kill`` (``early``, ``mid`` or ``checkpoint``) instead SIGKILLs the store's writer (the
launcher, or rank 0 under torchrun) inside a flush's transaction, after its rows are inserted and
before COMMIT: the first flush, the first progress-only flush after a commit, or the flush that
commits the second checkpoint. Without ``$NBBATCH_FAULT`` nothing is injected.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Any

import torch

from procs import Summing, fill

FAULT_ENV = "NBBATCH_FAULT"
VECTOR = 8
WAIT_CAP = 120.0  # a "wait" that nobody releases must not outlive the test


def fault() -> dict[str, Any] | None:
    raw = os.environ.get(FAULT_ENV)
    return json.loads(raw) if raw else None


def numbers(n: int = 64) -> list[int]:
    """The dataset: the integers 0..n-1."""
    return list(range(n))


def _mark(directory: str, name: str, text: str) -> None:
    """Create ``directory/name`` atomically, so a poller never reads it half-written."""
    tmp = os.path.join(directory, f".{name}.{os.getpid()}")
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, os.path.join(directory, name))


def _wait_for(path: str, cap: float) -> None:
    deadline = time.monotonic() + cap
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nobody created {path} within {cap:.0f}s")
        time.sleep(0.01)


class FaultJob(Summing):
    """See the module docstring."""

    def __init__(self, context: Any) -> None:
        super().__init__(context)
        self.rank = context.get_distributed_rank()
        self.fault = fault()
        self.fired = False
        self.checkpoints = 0
        self._maybe("__init__", None)

    def _maybe(self, hook: str, at: int | None) -> None:
        f = self.fault
        if f is None or self.fired or f.get("hook") != hook or int(f.get("rank", 0)) != self.rank:
            return
        if at is not None and at != int(f["at"]):
            return
        self.fired = True
        action = f["action"]
        if action == "raise":
            raise RuntimeError(f"injected fault in {hook} on rank {self.rank}")
        if action == "fill":
            fill(f["ballast"])
        elif action in ("wait", "hang"):
            _mark(f["dir"], f"reached-{self.rank}", str(os.getpid()))
            _wait_for(os.path.join(f["dir"], "go" if action == "wait" else "never"), WAIT_CAP)

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        self._maybe("process_batch", batch_idx)
        if self.fault is not None:
            time.sleep(float(self.fault.get("slow" if self.fired else "pace", 0.0)))
        self.reduce(batch)
        return {"value": batch * 3, "vector": batch.float()[:, None] + torch.arange(VECTOR, dtype=torch.float32)}

    def on_checkpoint_start(self) -> None:
        self.checkpoints += 1
        self._maybe("on_checkpoint_start", self.checkpoints)

    def on_finish(self) -> None:
        self._maybe("on_finish", None)


def _install_flush_kill(when: str, directory: str) -> None:
    """SIGKILL this process inside a flush's transaction (see the module docstring)."""
    from nbbatch._store import writer

    original = getattr(writer.StoreWriter, "_write", None)
    if original is None:  # pragma: no cover - the engine changed; the matrix must say so, not pass
        raise RuntimeError("nbbatch._store.writer.StoreWriter._write is gone: update fault_procs.flush_kill")
    seen = {"commits": 0}

    def _write(self: Any, con: Any, record: Any, commit: Any, now: float) -> None:
        original(self, con, record, commit, now)  # the rows are in the open transaction now
        if commit.batches:
            seen["commits"] += 1
        fire = (
            when == "early"
            or (when == "mid" and seen["commits"] >= 1 and not commit.batches)
            or (when == "checkpoint" and bool(commit.batches) and seen["commits"] == 2)
        )
        if fire:
            _mark(directory, "reached-flush", str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)

    writer.StoreWriter._write = _write  # type: ignore[method-assign]


def _is_writer() -> bool:
    return os.environ.get("NBBATCH_LOCAL_WORKER") != "1" and os.environ.get("RANK", "0") == "0"


_f = fault()
if _f is not None and _f.get("flush_kill") and _is_writer():
    _install_flush_kill(_f["flush_kill"], _f["dir"])
