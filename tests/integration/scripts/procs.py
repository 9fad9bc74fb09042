"""Processors and dataset factories for the CLI tests (loaded as `path/to/procs.py:attr`)."""

from __future__ import annotations

import os
import signal
import time

import torch

from nbbatch import TorchBatchProcessor


class Double(TorchBatchProcessor):
    """Returns 2x each sample; sums every sample in a reducer; sleeps $NBBATCH_TEST_SLEEP per batch."""

    def __init__(self, context):
        self.context = context
        self.total = context.wrap_reducer(lambda values: sum(sum(v) for v in values), name="total")
        self.sleep = float(os.environ.get("NBBATCH_TEST_SLEEP", "0"))

    def process_batch(self, batch, batch_idx):
        self.total.update([int(x) for x in batch])
        if self.sleep:
            time.sleep(self.sleep)
        return {"y": batch * 2, "worker": torch.full((len(batch),), self.context.get_distributed_rank())}


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
