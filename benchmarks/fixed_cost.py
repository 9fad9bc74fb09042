"""The fixed cost of one `torch_batch_process` call, by phase (issue: "outputs at the speed of the disk").

    .venv/bin/python benchmarks/fixed_cost.py [--repeat 3]

Each repeat is a fresh process (``--child``) that runs a tiny job (Linear(16, 8), 2,000 rows, 2
workers) as a script's first call, with the launcher's steps wrapped in timers: forkserver start
(waiting for its torch import), opening the store (`StoreWriter` + `begin`), worker start (process
start until each worker reports ready, which includes its process group and processor), the work,
the final commit and status, teardown (last worker finished until the call returns), and the
process exit after the script's last line. A separate pair of processes times a gloo
``init_process_group`` alone. The parent prints medians and the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

T0 = time.perf_counter()


def child() -> None:
    import nbbatch
    from nbbatch._launch import forkserver, local, supervisor
    from nbbatch._store import writer as store_writer

    marks: dict[str, float] = {}
    spans: dict[str, float] = {}

    def timed(owner: object, name: str, key: str, last: bool = False) -> None:
        original = getattr(owner, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                spans[key] = took if last else spans.get(key, 0.0) + took

        setattr(owner, name, wrapper)

    timed(local, "ensure_started", "forkserver start")
    timed(store_writer.StoreWriter, "__init__", "open store")
    timed(store_writer.StoreWriter, "begin", "open store")
    timed(store_writer.StoreWriter, "commit", "final commit", last=True)
    timed(store_writer.StoreWriter, "finish", "final status")
    handle = supervisor.Supervisor.handle

    def watch(self: object, event: object) -> None:
        kind = type(event).__name__
        now = time.perf_counter()
        marks.setdefault(f"first {kind}", now)
        marks[f"last {kind}"] = now
        handle(self, event)  # type: ignore[arg-type]

    supervisor.Supervisor.handle = watch  # type: ignore[method-assign]
    import torch

    class Tiny(nbbatch.TorchBatchProcessor):
        def __init__(self, context: object) -> None:
            self.model = torch.nn.Linear(16, 8)

        def process_batch(self, batch: torch.Tensor, batch_idx: int) -> object:
            with torch.no_grad():
                return {"y": self.model(batch)}

    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        data = torch.randn(2000, 16)
        call = time.perf_counter()
        nbbatch.torch_batch_process(Tiny, data, batch_size=250, num_processes=2, store=os.path.join(tmp, "s.duckdb"),
                                    progress=False)
        end = time.perf_counter()
    out = {
        "import and data (before the call)": call - T0,
        **spans,
        "worker start (to ready, incl. process group)": marks["last WorkerReady"] - call - spans["forkserver start"]
        - spans["open store"],
        "work (first batch to last worker finished)": marks["last WorkerFinished"] - marks["first BatchStarted"],
        "teardown (last worker finished to call return)": end - marks["last WorkerFinished"] - spans["final status"],
        "whole call": end - call,
    }
    print(json.dumps(out), flush=True)


def process_group() -> float:
    """Seconds for two fresh processes to join a gloo group on localhost (after importing torch)."""
    code = (
        "import sys, time, torch.distributed as d; t = time.perf_counter(); "
        "d.init_process_group('gloo', init_method='tcp://127.0.0.1:29533', rank=int(sys.argv[1]), world_size=2); "
        "print(time.perf_counter() - t); d.destroy_process_group()"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, text=True) for r in (0, 1)]
    return max(float(p.communicate()[0].strip()) for p in procs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--child", action="store_true")
    args = parser.parse_args()
    if args.child:
        child()
        return
    runs, loads, walls = [], [], []
    for _ in range(args.repeat):
        loads.append(os.getloadavg()[0])
        t = time.perf_counter()
        done = subprocess.run([sys.executable, __file__, "--child"], capture_output=True, text=True, check=True)
        walls.append(time.perf_counter() - t)
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    groups = [process_group() for _ in range(args.repeat)]
    print(f"load average {[round(x, 1) for x in loads]}")
    for key in runs[0]:
        print(f"  {key:50} {statistics.median(r[key] for r in runs):6.2f} s")
    exit_after = statistics.median(w - sum(r[k] for k in ("import and data (before the call)", "whole call"))
                                   for w, r in zip(walls, runs))
    print(f"  {'process exit after the call (incl. interpreter start)':50} {exit_after:6.2f} s")
    print(f"  {'gloo init_process_group alone (2 processes)':50} {statistics.median(groups):6.2f} s")
    print(f"  {'whole process':50} {statistics.median(walls):6.2f} s")


if __name__ == "__main__":
    main()
