"""The fixed cost of one `torch_batch_process` call, by phase, zygote against forkserver (issue 11).

    .venv/bin/python benchmarks/fixed_cost.py [--repeat 3] [--rows 200000 800000]

Each measurement is a fresh process (``--child VARIANT ROWS``) running the issue's tiny job as a
script's first call: ``Linear(16, 8)``, 2 workers, batches of 1,000, every output row stored. The
script follows the README's advice (``import nbbatch`` and look ``torch_batch_process`` up before
``import torch``) and runs one parallel torch op of its own before the call, as real scripts do.

Variants, alternating in every round so the machine's load hits them alike:

- ``forkserver``: ``NBBATCH_ZYGOTE=0``, workers come from the forkserver started at the lookup
  (the path before the zygote; still the path in Jupyter and where the caller initialised CUDA);
- ``zygote``: the caller forks a zygote where the launcher calls ``ensure_started`` today;
- ``zygote-early``: the same, but ``ensure_started`` runs first thing in the call, before the
  store opens (emulates the one-line change asked of ``local.py``);
- ``zygote-early+late-warm``: also starts the store's Arrow warm-up thread (`_warm_arrow_ingest`,
  whose first pyarrow array imports pandas, 0.2-0.35 s) when ``StoreWriter.begin`` returns instead
  of in ``StoreWriter.__init__`` (a prototype of a change to ``_store/writer.py``): ``begin``'s
  first parameterised insert then no longer waits on the warm-up's half-done ``import pandas``,
  and the import overlaps the workers' start instead.

The fixed cost is the intercept of the whole call's wall time over the two dataset sizes
(``t(n1) - n1 * (t(n2) - t(n1)) / (n2 - n1)``), and the same for the whole process; under load
the slope is noisy, so the table also gives the call minus its work phase (first batch started
to last worker finished), a direct reading of the fixed part. Phases come from
timers wrapped around the launcher's steps; CPU is the whole process tree's (``RUSAGE_CHILDREN``
from the parent: the script, its server and the workers the server reaped). The parent prints
medians, the load average before every run and writes ``results/fixed-cost-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

T0 = time.perf_counter()
RESULTS = pathlib.Path(__file__).resolve().parent / "results"
VARIANTS = ("forkserver", "zygote", "zygote-early", "zygote-early+late-warm")


def _instrument() -> tuple[dict[str, float], dict[str, float], dict[int, float], list[str | None]]:
    """Wrap the launcher's steps with timers: spans summed, event marks, worker pid -> WorkerReady.t, servers."""
    from multiprocessing import process

    from nbbatch._launch import forkserver, supervisor
    from nbbatch._store import writer as store_writer

    spans: dict[str, float] = {}
    marks: dict[str, float] = {}
    ready: dict[int, float] = {}
    kinds: list[str | None] = []

    def timed(owner: object, name: str, key: str, last: bool = False) -> None:
        original = getattr(owner, name)

        def wrapper(*args: object, **kwargs: object) -> object:
            start = time.perf_counter()
            marks.setdefault(f"{key} start", start)
            try:
                return original(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                spans[key] = took if last else spans.get(key, 0.0) + took

        setattr(owner, name, wrapper)

    original_ensure = forkserver.ensure_started
    timed(forkserver, "ensure_started", "server start")
    timed_ensure = forkserver.ensure_started

    def ensure_and_note() -> None:  # which server ran the workers (read before any release)
        timed_ensure()
        kinds.append(forkserver.server_kind())

    forkserver.ensure_started = ensure_and_note
    for module in list(sys.modules.values()):  # modules that bound the name at import
        if module is not forkserver and getattr(module, "ensure_started", None) is original_ensure:
            module.ensure_started = forkserver.ensure_started  # type: ignore[attr-defined]
    timed(store_writer.StoreWriter, "__init__", "open store")
    timed(store_writer.StoreWriter, "begin", "open store")
    timed(store_writer.StoreWriter, "commit", "final commit", last=True)
    timed(store_writer.StoreWriter, "finish", "final status")
    timed(process.BaseProcess, "start", "process start (Process.start, all workers)")
    handle = supervisor.Supervisor.handle

    def watch(self: object, event: object) -> None:
        kind = type(event).__name__
        now = time.perf_counter()
        marks.setdefault(f"first {kind}", now)
        marks[f"last {kind}"] = now
        if kind == "WorkerReady":
            ready[event.pid] = event.t  # type: ignore[attr-defined]
        handle(self, event)  # type: ignore[arg-type]

    supervisor.Supervisor.handle = watch  # type: ignore[method-assign]
    return spans, marks, ready, kinds


def _warm_after_begin() -> None:
    """Prototype: the store's warm-up thread starts its work once ``StoreWriter.begin`` has returned."""
    import threading

    from nbbatch._store import writer as store_writer

    begun = threading.Event()
    warm, begin = store_writer._warm_arrow_ingest, store_writer.StoreWriter.begin

    def late_warm() -> None:
        begun.wait()
        warm()

    def begin_then_warm(self: object, *args: object, **kwargs: object) -> object:
        try:
            return begin(self, *args, **kwargs)  # type: ignore[arg-type]
        finally:
            begun.set()

    store_writer._warm_arrow_ingest = late_warm
    store_writer.StoreWriter.begin = begin_then_warm  # type: ignore[method-assign,assignment]


def _worker_created(pid: int) -> float | None:
    """The worker's start as ``time.time()`` (from /proc, 10 ms resolution); None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as f:
            boot = time.time() - float(f.read().split()[0])  # /proc/stat's btime is whole seconds
    except (OSError, ValueError):
        return None
    return boot + ticks / os.sysconf("SC_CLK_TCK")


def child(variant: str, rows: int) -> None:
    """One script run: the README's import order, one parallel op, then the call."""
    if variant == "forkserver":
        os.environ["NBBATCH_ZYGOTE"] = "0"
    import nbbatch

    nbbatch.torch_batch_process  # noqa: B018 - the lookup starts the forkserver where one is expected
    import torch

    spans, marks, ready, kinds = _instrument()
    if variant.endswith("+late-warm"):
        _warm_after_begin()
    created: dict[int, float | None] = {}
    from nbbatch._launch import forkserver, supervisor

    handle = supervisor.Supervisor.handle

    def note_created(self: object, event: object) -> None:  # read /proc while the worker lives
        if type(event).__name__ == "WorkerReady":
            created[event.pid] = _worker_created(event.pid)  # type: ignore[attr-defined]
        handle(self, event)  # type: ignore[arg-type]

    supervisor.Supervisor.handle = note_created  # type: ignore[method-assign]

    class Tiny(nbbatch.TorchBatchProcessor):
        def __init__(self, context: object) -> None:
            self.model = torch.nn.Linear(16, 8)

        def process_batch(self, batch: torch.Tensor, batch_idx: int) -> object:
            with torch.no_grad():
                return {"y": self.model(batch)}

    import tempfile

    data = torch.randn(rows, 16)
    (data @ data[:16].T).sum()  # the caller's own OpenMP pool exists before the call
    with tempfile.TemporaryDirectory() as tmp:
        call = time.perf_counter()
        if variant.startswith("zygote-early"):
            forkserver.ensure_started()
        nbbatch.torch_batch_process(Tiny, data, batch_size=1000, num_processes=2,
                                    store=os.path.join(tmp, "s.duckdb"), progress=False)
        end = time.perf_counter()
        release = time.perf_counter()
        forkserver.release()
        release = time.perf_counter() - release
    setup = [ready[pid] - start for pid, start in created.items() if start is not None and pid in ready]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = {
        "server": kinds[-1] if kinds else None,
        "import and data (before the call)": call - T0,
        **spans,
        "worker setup (process created to WorkerReady, slowest)": max(setup) if setup else float("nan"),
        "call to last WorkerReady": marks["last WorkerReady"] - call,
        "work (first batch to last worker finished)": marks["last WorkerFinished"] - marks["first BatchStarted"],
        "teardown (last worker finished to call return)": end - marks["last WorkerFinished"]
        - spans.get("final status", 0.0),
        "release (retire the zygote)": release,
        "whole call": end - call,
        "whole call minus work": end - call - (marks["last WorkerFinished"] - marks["first BatchStarted"]),
        "caller cpu": usage.ru_utime + usage.ru_stime,
    }
    print(json.dumps(out), flush=True)


def process_group() -> float | None:
    """Seconds for two fresh processes to join a gloo group on localhost (after importing torch); None if it broke."""
    from nbbatch._launch.local import free_port

    code = (
        "import sys, time, torch.distributed as d; t = time.perf_counter(); "
        f"d.init_process_group('gloo', init_method='tcp://127.0.0.1:{free_port()}', rank=int(sys.argv[1]), "
        "world_size=2); print(time.perf_counter() - t); d.destroy_process_group()"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code, str(r)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for r in (0, 1)]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):  # another process can take the free port first on a shared machine
        print(f"  gloo alone: failed ({outs[0][1].strip().splitlines()[-1:]})", flush=True)
        return None
    return max(float(out.strip()) for out, _ in outs)


def _one(variant: str, rows: int) -> dict[str, object]:
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", variant, str(rows)], capture_output=True, text=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{variant} {rows} failed:\n{done.stderr}")
    run: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    run.update({"variant": variant, "rows": rows, "load": load, "whole process": wall,
                "tree cpu": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)})
    run["exit after the call"] = wall - float(run["import and data (before the call)"]) - float(run["whole call"])  # type: ignore[arg-type]
    return run


def _intercept(small: float, large: float, n1: int, n2: int) -> float:
    return small - n1 * (large - small) / (n2 - n1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--rows", type=int, nargs=2, default=[200_000, 800_000])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--child", nargs=2, metavar=("VARIANT", "ROWS"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]))
        return
    n1, n2 = args.rows
    runs = []
    for i in range(args.repeat):
        for rows in (n1, n2):
            order = args.variants if i % 2 == 0 else list(reversed(args.variants))
            for variant in order:
                runs.append(_one(variant, rows))
                print(f"  round {i + 1} {variant:12} {rows:>7} rows: call {runs[-1]['whole call']:.2f} s "
                      f"(load {runs[-1]['load']:.1f})", flush=True)
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"fixed-cost-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"runs": runs, "rows": [n1, n2]}, indent=1))
    groups = [g for g in (process_group() for _ in range(args.repeat)) if g is not None]
    loads = [float(r["load"]) for r in runs]  # type: ignore[arg-type]
    print(f"\nload average (1 min) before each run: min {min(loads):.1f}, median {statistics.median(loads):.1f}, "
          f"max {max(loads):.1f}")
    for variant in args.variants:  # the zygote falls back to the forkserver where a fork is unsafe
        servers = sorted({str(r["server"]) for r in runs if r["variant"] == variant})
        print(f"  {variant}: workers started from {', '.join(servers)}")
    keys = [k for k in runs[0] if isinstance(runs[0][k], float) and k != "load"]
    header = "".join(f"{v + ' ' + str(n // 1000) + 'k':>18}" for v in args.variants for n in (n1, n2))
    print(f"{'median seconds':52}{header}")
    for key in keys:
        cells = []
        for variant in args.variants:
            for rows in (n1, n2):
                values = [float(r[key]) for r in runs if r["variant"] == variant and r["rows"] == rows and key in r]  # type: ignore[arg-type]
                cells.append(f"{statistics.median(values):18.2f}" if values else f"{'-':>18}")
        print(f"  {key:50}{''.join(cells)}")
    summary: dict[str, dict[str, float]] = {}
    for variant in args.variants:
        medians = {(key, rows): statistics.median(float(r[key]) for r in runs if r["variant"] == variant and r["rows"] == rows)  # type: ignore[arg-type]
               for key in ("whole call", "whole process", "tree cpu") for rows in (n1, n2)}
        summary[variant] = {key: _intercept(medians[key, n1], medians[key, n2], n1, n2)
                            for key in ("whole call", "whole process", "tree cpu")}
    print("\nfixed cost per call (intercept over the two sizes):")
    for variant, fixed in summary.items():
        print(f"  {variant:24} whole call {fixed['whole call']:5.2f} s   whole process {fixed['whole process']:5.2f} s"
              f"   tree cpu {fixed['tree cpu']:5.2f} s")
    if groups:
        print(f"  gloo init_process_group alone (2 fresh processes): {statistics.median(groups):.2f} s")
    path.write_text(json.dumps({"runs": runs, "intercepts": summary, "gloo alone": groups, "rows": [n1, n2]}, indent=1))
    print(f"wrote {path.relative_to(RESULTS.parent.parent)}")


if __name__ == "__main__":
    main()
