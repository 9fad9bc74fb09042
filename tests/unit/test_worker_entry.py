"""A local worker process started as the launcher starts it: `WorkerArgs` through nbbatch's forkserver.

Checks the record crosses the forkserver (pipes included), that `Control.STOP` preempts at the
next checkpoint, that a closed control pipe (the launcher died) ends the worker, and the exit codes.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import cloudpickle
import pytest
import torch
from helpers import poll

from nbbatch._events import BatchDone, BatchFailed, Control, Event, Status, WorkerFinished
from nbbatch._launch.forkserver import context, ensure_started
from nbbatch._plan import make_sharding
from nbbatch._worker.entry import EXIT_FAILED, EXIT_LAUNCHER_GONE, EXIT_OK, WorkerArgs, worker_main
from nbbatch._worker.loop import WorkerSpec

pytestmark = pytest.mark.timeout(60)  # the first test starts the forkserver, which imports torch


def slow_processor(seconds: float) -> type:
    """A processor class defined here, so it travels by value (as a notebook's does)."""
    from nbbatch import TorchBatchProcessor

    class Slow(TorchBatchProcessor):
        def __init__(self, context: Any) -> None:
            pass

        def process_batch(self, batch: Any, batch_idx: int) -> Any:
            time.sleep(seconds)
            return {"y": batch}

    return Slow


def payload(tmp: str, seconds: float, n: int = 8) -> bytes:
    spec = WorkerSpec(
        user=cloudpickle.dumps((slow_processor(seconds), torch.arange(float(n)), {})), sharding=make_sharding(n, 1, 1),
        done=frozenset(), checkpoint_interval=1, on_error="raise", max_failures=None, output_dir=tmp,
    )
    return bytes(cloudpickle.dumps(spec))


class Started:
    """One worker and the launcher's ends of its pipes."""

    def __init__(self, data: bytes) -> None:
        ctx = context()
        ensure_started()
        self.events, send = ctx.Pipe(duplex=False)
        ctrl_recv, self.control = ctx.Pipe(duplex=False)
        args = WorkerArgs(rank=0, world_size=1, payload=data, events=send, control=ctrl_recv, master=("127.0.0.1", 0),
                          threads=1, environ=dict(os.environ), cwd=os.getcwd(), sys_path=list(sys.path))
        self.proc = ctx.Process(target=worker_main, args=(args,), name="nbbatch-test-rank0")
        self.proc.start()
        send.close()
        ctrl_recv.close()
        self.received: list[Event] = []

    def read_until(self, done: type, timeout: float = 30) -> Event:
        def one() -> Event | None:
            if self.events.poll(0.05):
                self.received.append(self.events.recv())
                if isinstance(self.received[-1], done):
                    return self.received[-1]
            return None

        return poll(one, timeout, f"a {done.__name__} event", every=0)

    def rest(self) -> list[Event]:
        try:
            while True:
                self.received.append(self.events.recv())
        except EOFError:
            return self.received

    def exitcode(self) -> int | None:
        self.proc.join(30)
        return self.proc.exitcode


def test_stop_on_the_control_pipe_preempts(tmp_path: Any) -> None:
    worker = Started(payload(str(tmp_path), 0.05, n=200))
    worker.read_until(BatchDone)
    worker.control.send(Control.STOP)
    events = worker.rest()
    assert worker.exitcode() == EXIT_OK
    finished = events[-1]
    assert isinstance(finished, WorkerFinished) and finished.status == Status.PREEMPTED
    assert sum(isinstance(e, BatchDone) for e in events) < 200
    worker.control.close()


def test_a_closed_control_pipe_ends_the_worker(tmp_path: Any) -> None:
    worker = Started(payload(str(tmp_path), 0.05, n=200))
    worker.read_until(BatchDone)
    worker.control.close()  # the launcher is gone
    assert worker.exitcode() == EXIT_LAUNCHER_GONE
    assert not any(isinstance(e, WorkerFinished) for e in worker.rest())


def test_a_payload_that_does_not_load_is_reported(tmp_path: Any) -> None:
    worker = Started(b"not a pickle")
    events = worker.rest()
    assert worker.exitcode() == EXIT_FAILED
    assert len(events) == 1 and isinstance(events[0], BatchFailed) and events[0].fatal and events[0].global_batch is None
    worker.control.close()
