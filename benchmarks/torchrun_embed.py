"""The 512-d embeddings job under torchrun: how fast rank 0's store takes every rank's outputs.

    NBBATCH_SEGMENTS=0 torchrun --standalone --nproc-per-node 4 benchmarks/torchrun_embed.py ROWS STORE   # inline
    torchrun --standalone --nproc-per-node 4 benchmarks/torchrun_embed.py ROWS STORE                      # segments

Rank 0 prints one JSON line: rows, the whole call's seconds and rows/s, and the rows/s from the first
batch's start to the last commit (the store's own timestamps). Ranks on one machine see the
launcher's segment folder, so with segments each rank writes its own files.
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


if __name__ == "__main__":
    main()
