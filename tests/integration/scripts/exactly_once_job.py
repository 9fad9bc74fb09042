"""A launcher for the exactly-once tests: python exactly_once_job.py STORE N BS WORKERS INTERVAL [SLEEP]."""

import sys
import time

from procs import Summing  # this script's folder is sys.path[0]

from nbbatch import torch_batch_process


class Job(Summing):
    def __init__(self, context):
        super().__init__(context)
        self.sleep = float(sys.argv[6]) if len(sys.argv) > 6 else 0.0

    def process_batch(self, batch, batch_idx):
        time.sleep(self.sleep)
        self.reduce(batch)
        return {"value": batch * 3}


if __name__ == "__main__":
    store, n, bs, workers, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    run = torch_batch_process(Job, list(range(n)), batch_size=bs, num_processes=workers, checkpoint_interval=interval,
                              store=store, run_name="job", progress=False)
    print(run.status, flush=True)
