"""A slow run for the dashboard tests: ``python slow_run.py STORE NAME [--n N] [--sleep S] [--fail-at I]``.

`Slow` sleeps per batch, reports a per-batch metric, sums samples in a reducer and fails on the
batch holding ``--fail-at`` (skipped with ``on_error="skip"``). Started this way the run has no
launch info (like a notebook's); the tests start the same class through the CLI
(``python -m nbbatch run slow_run.py:Slow --dataset slow_run.py:numbers``) to get a resumable one.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from nbbatch import TorchBatchProcessor, torch_batch_process


class Slow(TorchBatchProcessor):
    """Sleeps $NBBATCH_UI_SLEEP s per batch; fails on sample $NBBATCH_UI_FAIL_AT; reports `loss`.

    With $NBBATCH_UI_GATE set, batches after each worker's first wait until that file exists.
    """

    def __init__(self, context):
        self.context = context
        self.total = context.wrap_reducer(lambda values: sum(sum(v) for v in values), name="total")
        self.sleep = float(os.environ.get("NBBATCH_UI_SLEEP", "0.1"))
        self.fail_at = int(os.environ.get("NBBATCH_UI_FAIL_AT", "-1"))
        self.gate = os.environ.get("NBBATCH_UI_GATE")  # a file: batches after the first wait for it

    def process_batch(self, batch, batch_idx):
        samples = [int(x) for x in batch]
        if self.fail_at in samples:
            raise ValueError(f"cannot process sample {self.fail_at}")
        time.sleep(self.sleep)
        while self.gate and batch_idx > 0 and not os.path.exists(self.gate):
            time.sleep(0.05)  # held until the test saw what it waits for: a run cannot end before
        self.total.update(samples)
        self.context.report_metrics("inference", batch_idx, {"loss": 1.0 / (1 + samples[0])})
        return {"y": batch * 2, "embedding": torch.stack([batch.float(), batch.float() + 0.5], dim=1)}


def numbers(n=60):
    """The integers 0..n-1."""
    return list(range(n))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("name")
    parser.add_argument("--n", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sleep", type=float, default=0.1)
    parser.add_argument("--fail-at", type=int, default=-1)
    args = parser.parse_args()
    os.environ["NBBATCH_UI_SLEEP"] = str(args.sleep)
    os.environ["NBBATCH_UI_FAIL_AT"] = str(args.fail_at)
    # The class under its module name (`slow_run.Slow`, not `__main__.Slow`), shipped by value as
    # the CLI ships classes from files.
    import cloudpickle
    import slow_run

    cloudpickle.register_pickle_by_value(slow_run)
    run = torch_batch_process(
        slow_run.Slow, numbers(args.n), batch_size=args.batch_size, checkpoint_interval=2, num_processes=2,
        store=args.store, run_name=args.name, on_error="skip", max_failures=5, progress=False,
    )
    print(f"{run.name} {run.status}", flush=True)
    sys.exit(0 if run.status == "done" else 3)


if __name__ == "__main__":
    main()
