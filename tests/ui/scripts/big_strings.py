"""A run with 2 MB string outputs: ``python big_strings.py STORE NAME [--n N]``.

Each sample's ``text`` output is 2,000,000 characters (``"x" * ...`` then the sample's index);
the batch holding sample 8 fails with a 2 MB message (skipped), so its traceback is long too.
The dashboard must show all of it clipped, keeping the page small.
"""

from __future__ import annotations

import argparse
import sys

from nbbatch import TorchBatchProcessor, torch_batch_process

SIZE = 2_000_000


class BigStrings(TorchBatchProcessor):
    """Returns one 2 MB string per sample; fails on the batch holding sample 8."""

    def __init__(self, context):
        self.context = context

    def process_batch(self, batch, batch_idx):
        samples = [int(x) for x in batch]
        if 8 in samples:
            raise ValueError("too long: " + "y" * SIZE)
        return {"text": ["x" * SIZE + f" #{i}" for i in samples], "sample": samples}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("name")
    parser.add_argument("--n", type=int, default=28)
    args = parser.parse_args()
    import big_strings
    import cloudpickle

    cloudpickle.register_pickle_by_value(big_strings)  # workers get the class by value, as for slow_run.py
    run = torch_batch_process(big_strings.BigStrings, list(range(args.n)), batch_size=4, checkpoint_interval=2,
                              num_processes=1, store=args.store, run_name=args.name, on_error="skip",
                              max_failures=2, progress=False)
    print(f"{run.name} {run.status}", flush=True)
    sys.exit(0 if run.status == "done" else 3)


if __name__ == "__main__":
    main()
