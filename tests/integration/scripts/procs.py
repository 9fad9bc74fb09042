"""Processors and dataset factories for the CLI tests (loaded as `path/to/procs.py:attr`), and the
pieces every test processor shares: `Sum`, `Summing` and `fill`.

Scripts run as subprocesses import this file as their sibling; tests import it through
``tests/helpers.py`` (which puts this folder on ``sys.path``). Workers import it by the same name:
they get the launcher's ``sys.path``. It has no side effects and needs only nbbatch and torch.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from typing import Any

import torch

from nbbatch import MetricReducer, TorchBatchProcessor


class Sum(MetricReducer):
    """Sum of the values it was given, across workers (and attempts, through the stored states)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.total = 0

    def update(self, value: int) -> None:
        self.total += value

    def per_slot_reduce(self) -> int:
        return self.total

    def cross_slot_reduce(self, per_slot_metrics: list[int]) -> int:
        return sum(per_slot_metrics)


class Summing(TorchBatchProcessor):
    """Reduces ``sum`` (a `Sum` of the samples) and ``order`` (the samples in global order) over the batches
    passed to `reduce`: what `helpers.check_exactly_once` checks after a resume."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.sum = context.wrap_reducer(Sum(), name="sum")
        self.order = context.wrap_reducer(lambda values: values, name="order")

    def reduce(self, batch: Any) -> None:
        self.sum.update(int(batch.sum()))
        for value in batch.tolist():
            self.order.update(value)


def fill(path: str) -> None:
    """Write zeros to ``path`` until its disk is full, as any other program on the machine might."""
    chunk = b"\0" * 65536
    with open(path, "wb", buffering=0) as handle:
        try:
            while True:
                handle.write(chunk)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                raise
    with contextlib.suppress(OSError), open(path, "ab", buffering=0) as handle:
        while True:  # the last few bytes too
            handle.write(b"\0" * 512)


class Double(TorchBatchProcessor):
    """Returns 2x each sample; sums every sample in a reducer; sleeps $NBBATCH_TEST_SLEEP per batch.

    ``y`` is a view of one buffer filled again for every batch, as inference code that preallocates
    its outputs does: the store must keep each batch's own values.
    """

    def __init__(self, context):
        self.context = context
        self.total = context.wrap_reducer(lambda values: sum(sum(v) for v in values), name="total")
        self.sleep = float(os.environ.get("NBBATCH_TEST_SLEEP", "0"))
        self.out = torch.empty(0)

    def process_batch(self, batch, batch_idx):
        self.total.update([int(x) for x in batch])
        if self.sleep:
            time.sleep(self.sleep)
        out = self.out
        if len(out) < len(batch) or out.dtype != batch.dtype or out.shape[1:] != batch.shape[1:]:
            self.out = out = torch.empty_like(batch)
        y = torch.mul(batch, 2, out=out[: len(batch)])
        return {"y": y, "worker": torch.full((len(batch),), self.context.get_distributed_rank())}


class Failing(Double):
    """Raises on the batch holding sample $NBBATCH_TEST_FAIL_AT (default 10)."""

    def process_batch(self, batch, batch_idx):
        if int(os.environ.get("NBBATCH_TEST_FAIL_AT", "10")) in [int(x) for x in batch]:
            raise ValueError(f"cannot process sample {os.environ.get('NBBATCH_TEST_FAIL_AT', '10')}")
        return super().process_batch(batch, batch_idx)


class SelfKilling(Double):
    """SIGKILLs its own process on the batch holding sample $NBBATCH_TEST_KILL_AT, as the OOM killer would."""

    def process_batch(self, batch, batch_idx):
        if int(os.environ.get("NBBATCH_TEST_KILL_AT", "-1")) in [int(x) for x in batch]:
            os.kill(os.getpid(), signal.SIGKILL)
        return super().process_batch(batch, batch_idx)


def numbers(n=100):
    """The integers 0..n-1 as a list dataset."""
    return list(range(n))


NUMBERS = list(range(30))


def not_a_processor(x):
    return x
