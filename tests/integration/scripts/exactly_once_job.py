"""A launcher for the exactly-once tests: python exactly_once_job.py STORE N BS WORKERS INTERVAL [SLEEP]."""

import sys
import time

from nbbatch import MetricReducer, TorchBatchProcessor, torch_batch_process


class Sum(MetricReducer):
    def __init__(self):
        self.reset()

    def reset(self):
        self.total = 0

    def update(self, value):
        self.total += value

    def per_slot_reduce(self):
        return self.total

    def cross_slot_reduce(self, per_slot_metrics):
        return sum(per_slot_metrics)


class Job(TorchBatchProcessor):
    def __init__(self, context):
        self.sum = context.wrap_reducer(Sum(), name="sum")
        self.order = context.wrap_reducer(lambda values: values, name="order")
        self.sleep = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0

    def process_batch(self, batch, batch_idx):
        time.sleep(self.sleep)
        self.sum.update(int(batch.sum()))
        for value in batch.tolist():
            self.order.update(value)
        return {"value": batch * 3}


if __name__ == "__main__":
    store, n, bs, workers, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    run = torch_batch_process(Job, list(range(n)), batch_size=bs, num_processes=workers, checkpoint_interval=interval,
                              store=store, run_name="job", progress=False)
    print(run.status, flush=True)
