"""`TableDataset` against an in-memory `TensorDataset`: rows/s into a no-op processor, and the snapshot time.

The data: 1M rows of ``(id BIGINT, f0..f15 FLOAT)`` in one Parquet file, and the same numbers as
``TensorDataset(ids, floats)``. Each measurement is a whole `torch_batch_process` call (2
workers, batch 1024, a processor that returns nothing), so worker start-up counts on both sides
and the table side pays its snapshot too. Pairs alternate; the median of ``--repeat`` pairs is
reported. The snapshot alone (`bind_inputs`: copy, number, hash, 1M rows) is timed separately.
Contracts (issue 12): table rows/s >= 0.5x the tensor rows/s; snapshot of 1M rows < 2 s. Run:
``.venv/bin/python benchmarks/table_dataset.py [--rows 1000000] [--repeat 3]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import duckdb
import torch
from torch.utils.data import TensorDataset

from nbbatch import TableDataset, TorchBatchProcessor, TorchBatchProcessorContext, torch_batch_process
from nbbatch._table import bind_inputs

FEATURES = 16


class NoOp(TorchBatchProcessor):
    """Touches the batch and returns nothing: what is measured is the feeding."""

    def __init__(self, context: TorchBatchProcessorContext) -> None:
        self.rows = 0

    def process_batch(self, batch: Any, batch_idx: int) -> None:
        first = batch["id"] if isinstance(batch, dict) else batch[0]
        self.rows += len(first)


def write_parquet(path: str, rows: int) -> None:
    columns = ", ".join(f"random()::FLOAT AS f{i}" for i in range(FEATURES))
    duckdb.sql(f"COPY (SELECT range AS id, {columns} FROM range({rows})) TO '{path}' (FORMAT parquet)")


def tensors(path: str) -> TensorDataset:
    """The same rows, in memory."""
    frame = duckdb.sql(f"SELECT * FROM read_parquet('{path}')").fetchnumpy()
    ids = torch.from_numpy(frame["id"].copy())
    floats = torch.stack([torch.from_numpy(frame[f"f{i}"].copy()) for i in range(FEATURES)], dim=1)
    return TensorDataset(ids, floats)


def timed_run(dataset: Any, store: str, batch_size: int, workers: int) -> float:
    start = time.perf_counter()
    run = torch_batch_process(NoOp, dataset, batch_size=batch_size, num_processes=workers, store=store,
                              checkpoint_interval=50, progress=False)
    seconds = time.perf_counter() - start
    assert run.status == "done", run.status
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--processes", type=int, default=2)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="nbbatch-table-bench-") as tmp:
        source = os.path.join(tmp, "in.parquet")
        write_parquet(source, args.rows)
        snapshots, cpu = [], []
        for i in range(args.repeat):
            start, start_cpu = time.perf_counter(), time.process_time()
            bind_inputs(TableDataset(source), os.path.join(tmp, f"snap{i}", "s.duckdb"))
            snapshots.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)  # all threads: what an idle machine would need at most
        memory = tensors(source)
        table_s, tensor_s = [], []
        for i in range(args.repeat):  # alternate, so load on the machine hits both alike
            table_s.append(timed_run(TableDataset(source), os.path.join(tmp, f"t{i}.duckdb"), args.batch_size,
                                     args.processes))
            tensor_s.append(timed_run(memory, os.path.join(tmp, f"m{i}.duckdb"), args.batch_size, args.processes))
    table_rate = args.rows / statistics.median(table_s)
    tensor_rate = args.rows / statistics.median(tensor_s)
    result = {
        "rows": args.rows, "batch_size": args.batch_size, "processes": args.processes,
        "snapshot_s_median": round(statistics.median(snapshots), 3), "snapshot_s_max": round(max(snapshots), 3),
        "snapshot_cpu_s_median": round(statistics.median(cpu), 3), "load_average": os.getloadavg()[0],
        "table_rows_per_s": round(table_rate), "tensor_rows_per_s": round(tensor_rate),
        "ratio": round(table_rate / tensor_rate, 3),
        "table_s": [round(s, 2) for s in table_s], "tensor_s": [round(s, 2) for s in tensor_s],
    }
    print(f"snapshot of {args.rows:,} rows: {result['snapshot_s_median']} s median, {result['snapshot_s_max']} s max, "
          f"{result['snapshot_cpu_s_median']} s CPU (contract < 2 s; load average {result['load_average']:.1f})")
    print(f"TableDataset {table_rate:,.0f} rows/s vs TensorDataset {tensor_rate:,.0f} rows/s: "
          f"{result['ratio']}x (contract >= 0.5x); whole calls incl. worker start and the snapshot")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
