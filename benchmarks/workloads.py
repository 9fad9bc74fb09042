"""One benchmark workload in one fresh process: ``python workloads.py WORKLOAD VARIANT [ARGS]``.

Prints one JSON line: the in-process seconds of the work (model built, data processed, outputs
written) and the number of items. ``run_all.py`` times the whole process around it.

Workloads: ``resnet`` (resnet18 on 32x32 images), ``linear`` (Linear(16, 8), every output row
stored), ``embed`` (Linear(16, 512), every 512-float vector stored, as embedding jobs do), ``noop``
(a processor that does nothing). Variants: ``loop`` (a plain PyTorch loop
writing Parquet) and ``nbbatch`` (torch_batch_process with N workers, outputs to DuckDB).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import tempfile
import time

T_START = time.perf_counter()

if len(sys.argv) > 2 and sys.argv[2] == "nbbatch":
    # As the README advises: import nbbatch first, and its workers' forkserver imports torch while
    # this process does. The loop variant never imports nbbatch.
    import nbbatch  # noqa: F401

    nbbatch.torch_batch_process  # noqa: B018 - the lookup starts the forkserver

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402



#: Output width of the Linear workloads.
WIDTH = {"linear": 8, "embed": 512}


class Tensors(torch.utils.data.Dataset):
    """Pre-generated samples, so both variants read the same in-memory data."""

    def __init__(self, data: torch.Tensor) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]


def make_model(workload: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if workload == "resnet":
        return torchvision.models.resnet18(weights=None, num_classes=10)
    return torch.nn.Linear(16, WIDTH.get(workload, 8))


def make_data(workload: str, n: int) -> Tensors:
    g = torch.Generator().manual_seed(0)
    shape = (n, 3, 32, 32) if workload == "resnet" else (n, 16)
    return Tensors(torch.randn(shape, generator=g))


def loop(workload: str, data: Tensors, batch_size: int, out_dir: str) -> float:
    """Run the hand-written loop; return its steady seconds (first batch to Parquet file closed)."""
    model = make_model(workload).eval()
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size)
    writer = None
    rows = 0
    t_first = time.perf_counter()
    with torch.no_grad():
        for i, batch in enumerate(loader):
            out = model(batch)
            if workload == "noop":
                continue
            if workload == "resnet":
                table = pa.table({"sample_index": range(rows, rows + len(batch)), "prediction": out.argmax(1).numpy()})
            else:
                width = WIDTH[workload]
                table = pa.table({"sample_index": range(rows, rows + len(batch)),
                                  "y": pa.FixedSizeListArray.from_arrays(pa.array(out.numpy().reshape(-1)), width)})
            writer = writer or pq.ParquetWriter(os.path.join(out_dir, "out.parquet"), table.schema)
            writer.write_table(table)
            rows += len(batch)
    if writer is not None:
        writer.close()
    return time.perf_counter() - t_first


def processors() -> dict[str, type]:
    """The processor classes (defined here so that only the nbbatch variant imports nbbatch)."""
    from nbbatch import TorchBatchProcessor

    class Infer(TorchBatchProcessor):
        def __init__(self, context):
            self.model = context.prepare_model_for_inference(make_model(os.environ["BENCH_WORKLOAD"]))

        def process_batch(self, batch, batch_idx):
            with torch.no_grad():
                out = self.model(batch)
            if os.environ["BENCH_WORKLOAD"] == "resnet":
                return {"prediction": out.argmax(1)}
            return {"y": out}

    class Noop(TorchBatchProcessor):
        def __init__(self, context):
            pass

        def process_batch(self, batch, batch_idx):
            return None

    return {"Infer": Infer, "Noop": Noop}


def main() -> None:
    workload, variant, n, batch_size, workers = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    os.environ["BENCH_WORKLOAD"] = workload
    data = make_data(workload, n)
    with tempfile.TemporaryDirectory() as tmp:
        t0, wall0 = time.perf_counter(), time.time()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        phases: dict[str, float] = {}
        if variant == "loop":
            torch.set_num_threads(workers)
            steady = loop(workload, data, batch_size, tmp)
        else:
            # Imported here so that the loop variant never pays for (or races with) nbbatch.
            from nbbatch import torch_batch_process

            cls = processors()["Noop" if workload == "noop" else "Infer"]
            run = torch_batch_process(cls, data, batch_size=batch_size, num_processes=workers, checkpoint_interval=20,
                                      store=os.path.join(tmp, "bench.duckdb"), progress=False)
            assert run.status == "done"
            if workload != "noop":
                assert run.counts["rows"] == n
        seconds = time.perf_counter() - t0
        if variant != "loop":
            # From the first batch's start to the last commit: throughput once workers run, storage included.
            steady = run.sql(
                "SELECT epoch(max(committed_at)) - epoch(min(started_at)) FROM batches WHERE run_id = $id",
                params={"id": run.id},
            ).fetchall()[0][0]
            first, last = run.sql(
                "SELECT epoch(min(started_at)), epoch(max(committed_at)) FROM batches WHERE run_id = $id",
                params={"id": run.id},
            ).fetchall()[0]
            # Where the call's time goes: start-up (store, spawn, unpickling, model build) and tail.
            cpu1 = resource.getrusage(resource.RUSAGE_SELF)
            phases = {"to_first_batch": first - wall0, "after_last_commit": wall0 + seconds - last,
                      # CPU the launcher itself used during the call (DuckDB flushes, pickling, pipes).
                      "launcher_cpu": cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime}
    print(json.dumps({"workload": workload, "variant": variant, "n": n, "batch_size": batch_size, "workers": workers,
                      "seconds": seconds, "steady_seconds": steady, "since_start": time.perf_counter() - T_START,
                      "before_call": t0 - T_START, **phases}))


if __name__ == "__main__":
    main()
