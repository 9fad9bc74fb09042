"""Does a completed torchrun job end cleanly? Runs a 2-rank ``torchrun --standalone`` job N times.

    .venv/bin/python benchmarks/torchrun_clean_exit.py [--repeat 20] [--samples 80] [--load 0]

Counts non-zero exits and stderr/stdout lines about aborts or leaks (``terminate called``,
``SIGABRT``, ``Aborted``, ``nanobind: leaked``, "process group has NOT been destroyed", ...), and
the seconds from the job's last line to its pipes closing. ``--load K`` runs K busy-looping
processes meanwhile: the abort showed only on a loaded machine. Exits 1 if any repeat was unclean.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
JOB = HERE.parent / "tests" / "integration" / "scripts" / "torchrun_job.py"
BAD = re.compile(r"terminate called|SIGABRT|Abort|nanobind|leak|NOT been destroyed|ChildFailedError|Traceback",
                 re.IGNORECASE)


def _burn() -> None:  # pragma: no cover - load generator
    while True:
        pass


def once(samples: int, workdir: pathlib.Path) -> dict[str, object]:
    """One job: its exit code, the suspicious lines of its output, and last line -> pipes closed."""
    store = workdir / "s.duckdb"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(JOB),
           "--store", str(store), "--samples", str(samples), "--batch-size", "4", "--checkpoint-interval", "2",
           "--name", "clean"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=workdir, env=env, timeout=300)
    closed = time.time()
    stamps = [float(m) for m in re.findall(r"NBBATCH_RESULT done (\d+\.\d+)", done.stdout)]
    return {
        "returncode": done.returncode,
        "bad_lines": [line for line in (done.stderr + done.stdout).splitlines() if BAD.search(line)],
        "last_line_to_eof": round(closed - stamps[0], 3) if stamps else None,
        "output": done.stdout + done.stderr,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--samples", type=int, default=80)
    parser.add_argument("--load", type=int, default=0, help="busy processes running meanwhile")
    args = parser.parse_args()
    burners = [mp.Process(target=_burn, daemon=True) for _ in range(args.load)]
    for b in burners:
        b.start()
    results = []
    try:
        for i in range(args.repeat):
            with tempfile.TemporaryDirectory(prefix="nbbatch-clean-exit-") as tmp:
                r = once(args.samples, pathlib.Path(tmp))
            results.append(r)
            print(f"{i + 1:3d}/{args.repeat} exit {r['returncode']} bad lines {len(r['bad_lines'])} "  # noqa: T201
                  f"last line -> EOF {r['last_line_to_eof']}s", flush=True)
            if r["returncode"] or r["bad_lines"]:
                for line in str(r["output"]).splitlines()[-80:]:
                    print(f"      | {line}", flush=True)  # noqa: T201
    finally:
        for b in burners:
            b.terminate()
    nonzero = sum(1 for r in results if r["returncode"] != 0)
    noisy = sum(1 for r in results if r["bad_lines"])
    eof = [r["last_line_to_eof"] for r in results if r["last_line_to_eof"] is not None]
    summary = {"repeats": len(results), "nonzero_exits": nonzero, "runs_with_abort_or_leak_lines": noisy,
               "last_line_to_eof_max_s": max(eof) if eof else None, "load": args.load}
    print(json.dumps(summary))  # noqa: T201
    return 1 if nonzero or noisy else 0


if __name__ == "__main__":
    sys.exit(main())
