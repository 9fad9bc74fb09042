"""A user script for the fault matrix: `FaultJob` over `numbers(N)`, run as plain python or under torchrun.

python fault_job.py --store S --name NAME --samples N --batch-size B --interval I [--workers W]
[--batch-timeout T]; the fault comes from ``$NBBATCH_FAULT`` (see fault_procs.py). Prints
``NBBATCH_RESULT <status>`` (rank 0) when `torch_batch_process` returns.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from fault_procs import FaultJob, numbers  # noqa: E402

from nbbatch import torch_batch_process  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--samples", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--interval", type=int, required=True)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--batch-timeout", type=float, default=None)
    args = parser.parse_args()
    run = torch_batch_process(
        FaultJob, numbers(args.samples), batch_size=args.batch_size, checkpoint_interval=args.interval,
        num_processes=args.workers, store=args.store, run_name=args.name, progress=False,
        batch_timeout=args.batch_timeout,
    )
    if os.environ.get("RANK", "0") == "0":
        print("NBBATCH_RESULT", run.status, flush=True)


if __name__ == "__main__":
    main()
