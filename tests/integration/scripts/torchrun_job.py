"""A script that calls `torch_batch_process` unchanged; test_torchrun.py launches it with torchrun."""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from procs import Double, Failing, SelfKilling

from nbbatch import torch_batch_process


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--checkpoint-interval", type=int, default=2)
    parser.add_argument("--store", required=True)
    parser.add_argument("--name", default=None)
    parser.add_argument("--processor", choices=["Double", "Failing", "SelfKilling"], default="Double")
    args = parser.parse_args()
    processor = {"Double": Double, "Failing": Failing, "SelfKilling": SelfKilling}[args.processor]
    run = torch_batch_process(
        processor, list(range(args.samples)), batch_size=args.batch_size, checkpoint_interval=args.checkpoint_interval,
        store=args.store, run_name=args.name, progress=False,
    )
    if os.environ.get("RANK") == "0":
        # The time stamp lets tests measure from the job's last line to its pipes closing.
        print("NBBATCH_RESULT", run.status, repr(time.time()), flush=True)


if __name__ == "__main__":
    main()
