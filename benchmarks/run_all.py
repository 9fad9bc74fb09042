"""Benchmarks: nbbatch against a plain single-process PyTorch loop, in one run, as ratios.

    make bench                 # or: .venv/bin/python benchmarks/run_all.py [--repeat 2]

Each measurement runs in a fresh process (interpreter start and imports included in the
"wall" numbers); variants alternate (loop, nbbatch, loop, ...) and the best of the repeats is kept,
because this is a shared 2-core machine. Results go to benchmarks/results/latest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent


def measure(workload: str, variant: str, n: int, batch_size: int, workers: int) -> dict[str, float]:
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(HERE / "workloads.py"), workload, variant, str(n), str(batch_size), str(workers)],
        capture_output=True, text=True, check=True, env={**os.environ, "NBBATCH_STORE": ""},
    )
    wall = time.perf_counter() - t0
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall"] = wall
    return result


def pair(workload: str, n: int, batch_size: int, workers: int, repeat: int) -> tuple[dict[str, float], dict[str, float]]:
    """Loop and nbbatch measured alternately (loop, nbbatch, loop, ...), so load changes hit both."""
    runs: dict[str, list[dict[str, float]]] = {"loop": [], "nbbatch": []}
    for _ in range(repeat):
        for variant in ("loop", "nbbatch"):
            runs[variant].append(measure(workload, variant, n, batch_size, workers))
    return summarize(runs["loop"]), summarize(runs["nbbatch"])


def best(workload: str, variant: str, n: int, batch_size: int, workers: int, repeat: int) -> dict[str, float]:
    return summarize([measure(workload, variant, n, batch_size, workers) for _ in range(repeat)])


def summarize(runs: list[dict[str, float]]) -> dict[str, float]:
    """Best of the repeats (the machine is shared), plus every run."""
    return {"seconds": min(r["seconds"] for r in runs), "wall": min(r["wall"] for r in runs),
            "steady": min(r["steady_seconds"] for r in runs),
            "all_seconds": [round(r["seconds"], 3) for r in runs], "all_wall": [round(r["wall"], 3) for r in runs],
            "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    results: dict[str, object] = {"cores": cores, "python": sys.version.split()[0]}
    rows = []

    # resnet18 on 8,192 32x32 images: throughput (in-process) and whole-process wall time.
    n = 8192
    loop, nb = pair("resnet", n, 64, cores, args.repeat)
    rows.append(("resnet18 images/s, first batch to last commit", n / loop["steady"], n / nb["steady"], "≥ 0.95×"))
    rows.append(("resnet18 images/s, call incl. worker start", n / loop["seconds"], n / nb["seconds"], ""))
    rows.append(("resnet18 whole-process wall s (8,192 images)", loop["wall"], nb["wall"], "≤ 1.15×"))
    results["resnet"] = {"loop": loop, "nbbatch": nb}

    # Linear(16, 8) over 200k rows, every output row stored.
    n, bs = 200_000, 1024
    loop, nb = pair("linear", n, bs, cores, args.repeat)
    rows.append((f"Linear(16,8) rows/s, first batch to last commit, bs {bs}", n / loop["steady"], n / nb["steady"], ""))
    rows.append(("Linear(16,8) rows/s, call incl. worker start", n / loop["seconds"], n / nb["seconds"], "≥ 0.5×"))
    rows.append(("Linear(16,8) whole-process wall s", loop["wall"], nb["wall"], ""))
    results["linear"] = {"loop": loop, "nbbatch": nb}

    # No-op processor: engine overhead per batch.
    # Two estimates: the call-time difference between 5,020 and 20 batches (noisy: start-up varies),
    # and the steady in-loop time per batch as one worker sees it (first start to last commit x W / batches).
    overhead = {}
    steady_overhead = {}
    for workers in (1, 2):
        short = best("noop", "nbbatch", 20, 1, workers, args.repeat)
        long = best("noop", "nbbatch", 5020, 1, workers, args.repeat)
        overhead[workers] = (long["seconds"] - short["seconds"]) / 5000 * 1000
        steady_overhead[workers] = long["steady"] * workers / 5020 * 1000
    results["noop_ms_per_batch"] = overhead
    results["noop_steady_ms_per_batch_per_worker"] = steady_overhead

    print(f"{'benchmark':48} {'loop':>12} {'nbbatch':>12} {'ratio':>8}  target")
    for name, a, b, target in rows:
        ratio = b / a
        print(f"{name:48} {a:12.1f} {b:12.1f} {ratio:8.2f}  {target}")
    for workers, ms in overhead.items():
        print(f"{'no-op overhead, ms/batch (call diff), workers=' + str(workers):48} {'':12} {ms:12.3f}")
        print(f"{'no-op overhead, ms/batch/worker (steady), W=' + str(workers):48} {'':12} {steady_overhead[workers]:12.3f}")
    results["table"] = [{"name": r[0], "loop": r[1], "nbbatch": r[2], "ratio": r[2] / r[1], "target": r[3]} for r in rows]
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    text = json.dumps(results, indent=2)
    (HERE / "results" / "latest.json").write_text(text)
    out = HERE / "results" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(text)
    print(f"saved {out} and results/latest.json")


if __name__ == "__main__":
    main()
