"""A plain script that runs `torch_batch_process` with local workers; the signal tests start it.

    python signal_job.py STORE NAME SAMPLES WORKERS   # $NBBATCH_TEST_SLEEP: seconds per batch

``$NBBATCH_TEST_LOADER_WORKERS`` sets the DataLoader's ``num_workers`` (default 0).

Its last line is ``NBBATCH_LAST <status> <time.time()>``, so a test can measure from the script's
end to its pipes closing.
"""

from __future__ import annotations

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from procs import Double

from nbbatch import torch_batch_process


def main() -> None:
    store, name, samples, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    loader_workers = int(os.environ.get("NBBATCH_TEST_LOADER_WORKERS", "0"))  # DataLoader worker processes
    run = torch_batch_process(Double, list(range(samples)), batch_size=2, num_processes=workers, checkpoint_interval=2,
                              store=store, run_name=name, progress=False,
                              dataloader_kwargs={"num_workers": loader_workers} if loader_workers else None)
    print("NBBATCH_LAST", run.status, repr(time.time()), flush=True)


if __name__ == "__main__":
    main()
