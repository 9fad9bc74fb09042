"""Which forks of a torch process work: the measurements behind `nbbatch/_launch/zygote.py`.

    .venv/bin/python benchmarks/fork_hazards.py

Each case runs in a fresh process: the parent does something (nothing, a small or a large parallel
torch op, a DuckDB query, CUDA where there is a GPU), then forks, from its main thread or from a
fresh thread, and the child (and a grandchild of it, as a zygote's worker) runs parallel torch
ops with 2 threads. A child that does not finish within ``--alarm`` seconds is reported as hung.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time

CASES = ["nothing", "small-op", "large-op", "duckdb", "cuda-available", "cuda-init"]


def _parallel_ops(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(600, 600)
    for _ in range(3):
        (a @ a + a).sum()
    if torch.cuda.is_available() and os.environ.get("HAZARD_CUDA_CHILD") == "1":
        torch.zeros(4, device="cuda").sum().item()


def _parent_does(case: str) -> None:
    import torch

    if case == "small-op":
        torch.nn.Linear(16, 8)(torch.randn(2000, 16))
    elif case == "large-op":
        a = torch.randn(600, 600)
        (a @ a + a).sum()
    elif case == "duckdb":
        import duckdb

        duckdb.connect().execute("SELECT sum(range) FROM range(5000000)").fetchall()
    elif case == "cuda-available":
        torch.cuda.is_available()
    elif case == "cuda-init":
        torch.zeros(1, device="cuda")


def _child(alarm: int, threads: int) -> None:
    signal.alarm(alarm)
    code = 0
    try:
        grandchild = os.fork()
        if grandchild == 0:
            try:
                _parallel_ops(threads)
            finally:
                os._exit(0)
        _parallel_ops(threads)
        _, status = os.waitpid(grandchild, 0)
        code = 0 if status == 0 else 2
    except BaseException:
        code = 3
    os._exit(code)


def case_main(case: str, where: str, alarm: int, threads: int) -> None:
    """One case in this process: prints ``ok``, ``hung`` or ``failed``."""
    _parent_does(case)
    with open("/proc/self/maps") as maps:
        driver = any("libcuda.so" in line for line in maps)
    pids: list[int] = []

    def fork() -> None:
        pid = os.fork()
        if pid == 0:
            _child(alarm, threads)
        pids.append(pid)

    start = time.perf_counter()
    if where == "thread":
        thread = threading.Thread(target=fork)
        thread.start()
        thread.join()
    else:
        fork()
    _, status = os.waitpid(pids[0], 0)
    took = time.perf_counter() - start
    verdict = "hung" if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGALRM else (
        "ok" if status == 0 else "failed")
    print(f"{case:15} fork from {where:6} child threads {threads}: {verdict:6} ({took:.2f} s; "
          f"libcuda mapped in the parent: {driver})", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alarm", type=int, default=10)
    parser.add_argument("--case", nargs=3, metavar=("CASE", "WHERE", "THREADS"))
    args = parser.parse_args()
    if args.case:
        case_main(args.case[0], args.case[1], args.alarm, int(args.case[2]))
        return
    import torch

    cases = CASES if torch.cuda.is_available() else CASES[:4]
    env = {**os.environ, "HAZARD_CUDA_CHILD": "1"}
    for case in cases:
        for where, threads in (("main", 2), ("main", 1), ("thread", 2)):
            subprocess.run([sys.executable, __file__, "--alarm", str(args.alarm), "--case", case, where, str(threads)],
                           env=env, check=False)


if __name__ == "__main__":
    main()
