"""Outputs at the speed of the disk: inline (DuckDB) outputs against per-rank segments, beside the loop.

    .venv/bin/python benchmarks/segments.py [--repeat 3] [--only embed,linear,resnet] [--variants loop,inline,segments]

Each measurement is a fresh ``workloads.py`` process (interpreter start, imports and exit included
in "wall"). Variants alternate (loop, inline, segments, loop, ...) so load changes hit all of them,
and the median of the repeats is kept. ``inline`` runs nbbatch with ``NBBATCH_SEGMENTS=0`` (every
output row crosses the pipe and is inserted into DuckDB by the launcher, as before segments);
``segments`` with the default (workers write Parquet segments, the launcher commits manifests).
The 1-minute load average is recorded with every number: this is a shared 2-core machine, so
compare ratios taken in the same round, not absolute seconds. Results go to
``results/segments-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent

#: workload -> (rows, batch size); the issue's table.
WORKLOADS = {"embed": (100_000, 512), "linear": (200_000, 256), "resnet": (8192, 64)}
VARIANT_ENV = {"loop": {}, "inline": {"NBBATCH_SEGMENTS": "0"}, "segments": {"NBBATCH_SEGMENTS": "1"}}


def measure(workload: str, variant: str, n: int, batch_size: int, workers: int) -> dict[str, float]:
    """One fresh process; its JSON line plus the whole-process wall time and the load average."""
    load = os.getloadavg()[0]
    kind = "loop" if variant == "loop" else "nbbatch"
    env = {**os.environ, "NBBATCH_STORE": "", **VARIANT_ENV[variant]}
    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, str(HERE / "workloads.py"), workload, kind, str(n), str(batch_size), str(workers)],
        capture_output=True, text=True, check=True, env=env,
    )
    wall = time.perf_counter() - t0
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(wall=wall, load=load)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", default="embed,linear,resnet")
    parser.add_argument("--variants", default="loop,inline,segments")
    args = parser.parse_args()
    workers = len(os.sched_getaffinity(0))
    variants = args.variants.split(",")
    results: dict[str, object] = {"cores": workers, "python": sys.version.split()[0], "variants": variants}
    for workload in args.only.split(","):
        n, bs = WORKLOADS[workload]
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for _ in range(args.repeat):
            for variant in variants:
                runs[variant].append(measure(workload, variant, n, bs, workers))
        summary = {}
        for variant, rs in runs.items():
            summary[variant] = {
                "wall": statistics.median(r["wall"] for r in rs),
                "call": statistics.median(r["seconds"] for r in rs),
                "rows_per_s": n / statistics.median(r["seconds"] for r in rs),
                "load": [round(r["load"], 1) for r in rs],
                "runs": rs,
            }
        base = summary.get("loop")
        print(f"{workload} ({n} rows, bs {bs}, {workers} workers)")
        for variant, s in summary.items():
            ratio = (f"wall {s['wall'] / base['wall']:.2f}x, rows/s {s['rows_per_s'] / base['rows_per_s']:.2f}x"
                     if base else "")
            print(f"  {variant:9} wall {s['wall']:6.2f} s  call {s['call']:6.2f} s  {s['rows_per_s']:10,.0f} rows/s  "
                  f"{ratio}  load {s['load']}")
        results[workload] = summary
    results["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    out = HERE / "results" / f"segments-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
