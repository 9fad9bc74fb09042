"""The 512-d embeddings job under torchrun: how fast rank 0's store takes every rank's outputs.

    .venv/bin/python benchmarks/torchrun_embed.py [--rows 200000] [--repeat 3]    # both paths, alternating

runs ``torchrun --standalone --nproc-per-node 4`` on this script, alternating the rank-0 path
(``NBBATCH_SEGMENTS=0``: every rank's outputs travel to rank 0, which inserts them into DuckDB)
and segments (each rank writes its own files), and prints the medians; the runs go to
``results/torchrun-<timestamp>.json``. Under torchrun, rank 0 prints one JSON line: rows, the whole
call's seconds and rows/s, and the rows/s from the first batch's start to the last commit (the
store's own timestamps). Ranks on one machine see the launcher's segment folder, so with segments
each rank writes its own files.
"""

from __future__ import annotations

import json
import os
import sys
import time

import nbbatch  # noqa: I001 - first, as the README advises
import torch


class Embed(nbbatch.TorchBatchProcessor):
    def __init__(self, context: object) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Linear(16, 512)

    def process_batch(self, batch: torch.Tensor, batch_idx: int) -> object:
        with torch.no_grad():
            return {"embedding": self.model(batch)}


def main() -> None:
    rows, store = int(sys.argv[1]), sys.argv[2]
    data = torch.randn(rows, 16, generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    run = nbbatch.torch_batch_process(Embed, data, batch_size=512, checkpoint_interval=20, store=store, progress=False)
    seconds = time.perf_counter() - start
    if int(os.environ.get("RANK", "0")) == 0:
        (steady,) = run.sql("SELECT epoch(max(committed_at)) - epoch(min(started_at)) FROM batches WHERE run_id = $id",
                            params={"id": run.id}).fetchall()[0]
        stored = run.sql("SELECT count(*) FROM outputs").fetchall()[0][0]
        print(json.dumps({"rows": stored, "seconds": seconds, "rows_per_s": rows / seconds,
                          "steady_rows_per_s": rows / steady, "load": os.getloadavg()[0],
                          "segments": os.environ.get("NBBATCH_SEGMENTS", "auto")}), flush=True)


def compare(rows: int, repeat: int) -> None:
    """Both paths, alternating, ``repeat`` times each; medians printed, every run saved."""
    import pathlib
    import statistics
    import subprocess
    import tempfile

    here = pathlib.Path(__file__).resolve().parent
    runs: list[dict[str, object]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeat):
            for mode in ("0", "auto"):
                env = {k: v for k, v in os.environ.items() if k != "NBBATCH_SEGMENTS"}
                env.update({"NBBATCH_SEGMENTS": mode} if mode == "0" else {})
                store = os.path.join(tmp, f"{mode}-{i}.duckdb")
                done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                                       "--nproc-per-node", "4", __file__, str(rows), store],
                                      env=env, capture_output=True, text=True, check=True)
                runs.append(json.loads(next(line for line in done.stdout.splitlines() if line.startswith("{"))))
    out = here / "results" / f"torchrun-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(runs, indent=1))
    median = {mode: {key: statistics.median(float(r[key]) for r in runs if r["segments"] == mode)  # type: ignore[arg-type]
                     for key in ("rows_per_s", "steady_rows_per_s", "load")} for mode in ("0", "auto")}
    for key in ("rows_per_s", "steady_rows_per_s"):
        print(f"{key}: rank-0 path {median['0'][key]:,.0f}, segments {median['auto'][key]:,.0f}, "
              f"{median['auto'][key] / median['0'][key]:.2f}x")
    print(f"load (median): {median['0']['load']:.1f} / {median['auto']['load']:.1f}; runs in {out}")


if __name__ == "__main__":
    if "RANK" in os.environ:
        main()
    else:
        import argparse

        parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
        parser.add_argument("--rows", type=int, default=200_000)
        parser.add_argument("--repeat", type=int, default=3)
        args = parser.parse_args()
        compare(args.rows, args.repeat)
