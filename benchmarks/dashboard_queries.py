"""Time every dashboard view's query on a store with one run of 1M output rows.

Builds the store directly with DuckDB in nbbatch's schema (``ensure_schema`` creates the tables),
then times opening it read-only, each query in ``nbbatch._ui.dashboard.queries`` on an open
cursor, and a whole refresh (open, every view, close) as the dashboard does once a second. Run:
``.venv/bin/python benchmarks/dashboard_queries.py [--rows 1000000] [--store PATH] [--repeat 5]``.
Prints median and max ms per line.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import duckdb

from nbbatch._store.connection import ensure_schema, open_store
from nbbatch._store.schema import outputs_table_name
from nbbatch._ui.dashboard import queries

RUN_ID = "0123456789abcdef0123456789abcdef"
BATCH_SIZE = 64
WORLD = 4


def build(path: str, rows: int, runs: int = 20) -> None:
    """A store with one big finished run plus ``runs - 1`` small ones, written in bulk SQL."""
    batches = -(-rows // BATCH_SIZE)
    t0 = dt.datetime(2025, 1, 1)
    con = duckdb.connect(path)
    try:
        ensure_schema(con)
        for i in range(runs):
            run_id = RUN_ID if i == 0 else f"{i:032x}"
            n = rows if i == 0 else 1000
            con.execute(
                "INSERT INTO runs (run_id, name, status, processor, dataset_len, batch_size, checkpoint_interval, "
                "planned_batches, real_batches, world_size, attempt, done_at_start, on_error, output_dir, config, "
                "reduced_metrics, created_at, started_at, updated_at, finished_at) "
                "VALUES (?, ?, 'done', 'bench.Proc', ?, ?, 5, ?, ?, ?, 1, 0, 'skip', '/tmp/x', ?, ?, ?, ?, ?, ?)",
                [run_id, f"run{i}", n, BATCH_SIZE, -(-n // BATCH_SIZE), -(-n // BATCH_SIZE), WORLD,
                 json.dumps({"batch_size": BATCH_SIZE}), json.dumps({"accuracy": 0.5}),
                 t0 + dt.timedelta(hours=i), t0 + dt.timedelta(hours=i), t0 + dt.timedelta(hours=i, minutes=50),
                 t0 + dt.timedelta(hours=i, minutes=50)],
            )
        table = outputs_table_name(RUN_ID)
        con.execute(
            f"CREATE TABLE {table} AS SELECT ?::VARCHAR AS run_id, (g % ?)::INTEGER AS rank, (g // ?)::BIGINT AS batch_idx, "
            "g AS global_batch, s AS sample_index, [random()::FLOAT for _ in range(8)]::FLOAT[8] AS embedding, "
            "(s % 10)::BIGINT AS label FROM (SELECT range AS s, range // ? AS g FROM range(?)) ORDER BY random()",
            [RUN_ID, WORLD, WORLD, BATCH_SIZE, rows],
        )
        con.execute(
            "INSERT INTO batches SELECT ?, g, g % ?, g // ?, 1, ?, g * ?, ? + to_seconds(g * 0.1), 0.1, "
            "? + to_seconds(g * 0.1) FROM range(?) t(g)",
            [RUN_ID, WORLD, WORLD, BATCH_SIZE, BATCH_SIZE, t0, t0, batches],
        )
        con.execute(
            "INSERT INTO metrics SELECT ?, g % ?, g, g // ?, 'inference', g // ?, n, random(), NULL, "
            "? + to_seconds(g * 0.1) FROM range(?) t(g), (VALUES ('loss'), ('accuracy')) v(n)",
            [RUN_ID, WORLD, WORLD, WORLD, t0, batches],
        )
        seconds = int(batches * 0.1 / WORLD) + 1
        con.execute(
            "INSERT INTO progress_log SELECT ?, 1, ? + to_seconds(t), t * ?, t * ?, t * ? FROM range(?) r(t)",
            [RUN_ID, t0, batches // seconds, rows // seconds, batches // seconds, seconds],
        )
        con.execute(
            "INSERT INTO progress SELECT ?, 1, r, ? // ?, ? // ?, 0, 0, NULL, 'done', ? FROM range(?) t(r)",
            [RUN_ID, batches, WORLD, rows, WORLD, t0, WORLD],
        )
        con.execute(
            "INSERT INTO errors SELECT ?, 1, i % ?, i, i // ?, [i * ?], 'ValueError', 'bad sample', "
            "'Traceback (most recent call last):\n  ...\nValueError: bad sample', false, ? + to_seconds(i) FROM range(100) t(i)",
            [RUN_ID, WORLD, WORLD, BATCH_SIZE, t0],
        )
        con.execute("CHECKPOINT")
    finally:
        con.close()


def views(rows: int) -> dict[str, Callable[[duckdb.DuckDBPyConnection], Any]]:
    """Each dashboard view's query, as a function of a read cursor."""
    last_page = (rows - 1) // 20
    return {
        "runs table": lambda con: queries.runs(con, time.time()),
        "run detail": lambda con: queries.run_detail(con, RUN_ID),
        "workers": lambda con: queries.workers(con, RUN_ID, 1),
        "throughput": lambda con: queries.throughput(con, RUN_ID),
        "metrics": lambda con: queries.metric_series(con, RUN_ID),
        "errors": lambda con: queries.errors(con, RUN_ID),
        "outputs page 0": lambda con: queries.outputs_page(con, RUN_ID, 0),
        "outputs middle page": lambda con: queries.outputs_page(con, RUN_ID, last_page // 2),
        "outputs last page": lambda con: queries.outputs_page(con, RUN_ID, last_page),
    }


def _refresh(con: duckdb.DuckDBPyConnection) -> None:
    """What one refresh of the run view reads (outputs only when they changed; here always)."""
    queries.runs(con, time.time())
    detail = queries.run_detail(con, RUN_ID)
    queries.workers(con, RUN_ID, int(detail["attempt"]))
    queries.throughput(con, RUN_ID)
    queries.metric_series(con, RUN_ID)
    queries.errors(con, RUN_ID)
    queries.outputs_page(con, RUN_ID, 0)


def _time(fn: Callable[[], Any], repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1000)
    return times


def _line(name: str, times: list[float]) -> str:
    return f"{name:<34} median {statistics.median(times):7.1f} ms   max {max(times):7.1f} ms"


def _open_close(path: str) -> None:
    with open_store(path, write=False):
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--store", default=None, help="reuse or create this store (default: a temp file)")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or os.path.join(tmp, "bench.duckdb")
        if not os.path.exists(path):
            t = time.perf_counter()
            build(path, args.rows)
            print(f"built {path} with {args.rows:,} output rows in {time.perf_counter() - t:.1f}s")
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(_line("open + close (read-only)", _time(lambda: _open_close(path), args.repeat)))
        worst = 0.0
        for name, query in views(args.rows).items():
            with open_store(path, write=False) as con:  # the query alone, on an open cursor
                times = _time(lambda q=query, c=con: q(c), args.repeat)
            worst = max(worst, statistics.median(times))
            print(_line(name, times))

        def refresh() -> None:
            with open_store(path, write=False) as con:  # one refresh: open, every view, close
                _refresh(con)

        print(_line("full refresh (open + all views)", _time(refresh, args.repeat)))
        print(f"slowest view (median): {worst:.1f} ms (target < 200 ms)")


if __name__ == "__main__":
    main()
