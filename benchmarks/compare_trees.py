"""Before/after: the same workloads on two checkouts of nbbatch, alternating, median of the repeats.

    .venv/bin/python benchmarks/compare_trees.py OLD_TREE NEW_TREE [--repeat 3]

Each measurement is a fresh process running that tree's ``benchmarks/workloads.py`` with the tree
first on ``PYTHONPATH`` (so it imports that tree's nbbatch); runs alternate old, new, old, ... so a
change in load hits both. Prints, per workload, the call's seconds and the whole process's wall
seconds for each tree, and new/old.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKLOADS = [  # (name, workload, rows, batch size, workers)
    ("resnet18, 8,192 images", "resnet", 8192, 64, 2),
    ("Linear(16,8), 200k rows", "linear", 200_000, 1024, 2),
    ("Linear(16,512), 100k rows (embeddings)", "embed", 100_000, 512, 2),
    ("no-op, 2,000 batches", "noop", 2000, 1, 2),
]


def measure(tree: str, workload: str, n: int, batch_size: int, workers: int) -> tuple[float, float]:
    """``(call seconds, whole-process wall seconds)`` of one nbbatch run from ``tree``."""
    env = {**os.environ, "PYTHONPATH": tree, "NBBATCH_STORE": ""}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, os.path.join(tree, "benchmarks", "workloads.py"), workload, "nbbatch", str(n),
         str(batch_size), str(workers)],
        capture_output=True, text=True, check=True, env=env, cwd=tree,
    )
    wall = time.perf_counter() - t0
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"]), wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", action="append", help="workload to run (resnet, linear, embed, noop); repeatable")
    args = parser.parse_args()
    print(f"{'workload':40} {'old call':>9} {'new call':>9} {'ratio':>6} {'old wall':>9} {'new wall':>9} {'ratio':>6}")
    for name, workload, n, bs, workers in WORKLOADS:
        if args.only and workload not in args.only:
            continue
        runs: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for _ in range(args.repeat):
            for label in ("old", "new"):
                runs[label].append(measure(getattr(args, label), workload, n, bs, workers))
        old = [statistics.median(x) for x in zip(*runs["old"])]
        new = [statistics.median(x) for x in zip(*runs["new"])]
        print(f"{name:40} {old[0]:9.2f} {new[0]:9.2f} {new[0] / old[0]:6.2f} {old[1]:9.2f} {new[1]:9.2f} "
              f"{new[1] / old[1]:6.2f}", flush=True)


if __name__ == "__main__":
    main()
