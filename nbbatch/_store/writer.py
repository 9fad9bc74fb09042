"""The store's only writer: creates and resumes runs and commits checkpoints in one transaction.

One process per store writes (the launcher, or rank 0 under torchrun). Its `WriterLock` on the
sidecar ``<store>.lock`` keeps a second live run out with a clear error and tells readers that its
run is alive (``_store/lock.py``); the DuckDB file itself is opened only for each flush, so
dashboards in other processes can read between flushes.
Must not import anything from nbbatch but ``_events``, ``_errors`` and ``_store``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import duckdb
import pyarrow as pa

from nbbatch._errors import ResumeMismatch, StoreError
from nbbatch._events import BatchDone, BatchFailed, MetricRecord, SegmentWritten, Status
from nbbatch._store import inputs, segments
from nbbatch._store.arrow import (
    BATCH_SCHEMA,
    ERROR_SCHEMA,
    METRIC_SCHEMA,
    PROGRESS_SCHEMA,
    jsonable,
    metric_rows,
    outputs_table,
    rows_table,
    timestamp,
)
from nbbatch._store.columns import insert_outputs, output_columns
from nbbatch._store.connection import StoreOpenError, ensure_schema, open_store, writing
from nbbatch._store.inputs import InputsInfo
from nbbatch._store.lock import End, WriterLock, interrupted_error, keep_end
from nbbatch._store.schema import run_folder
from nbbatch._store.sql import ident
from nbbatch._store.trust import Signer

__all__ = ["Commit", "ProgressRow", "RunRecord", "RunSpec", "StoreWriter"]


@dataclass(frozen=True)
class RunSpec:
    """What a launch asks of the store: a name (or None for a new run) and the run's fingerprint."""

    name: str | None
    processor: str
    dataset_len: int
    batch_size: int
    max_batches: int | None
    checkpoint_interval: int
    world_size: int
    planned_batches: int
    real_batches: int
    on_error: str
    max_failures: int | None
    output_root: str
    launch: dict[str, Any] | None
    config: dict[str, Any]
    trust: bool = False  # re-sign the run's records with this user's key instead of refusing foreign ones
    inputs: InputsInfo | None = None  # a TableDataset's snapshot: rows and content hash (``_store/inputs.py``)


@dataclass(frozen=True)
class RunRecord:
    """The store's answer: which run this is and what of it is already committed."""

    run_id: str
    name: str
    status: str
    attempt: int
    planned_batches: int
    output_dir: str
    done: frozenset[int]
    reducer_states: tuple[tuple[int, int, tuple[bytes, ...]], ...]
    failures: int
    output_columns: tuple[str, ...] = ()  # of the outputs table so far: workers refuse keys differing in case


@dataclass(frozen=True)
class ProgressRow:
    """Live counters of one worker in the current attempt."""

    rank: int
    batches: int
    rows: int
    failed: int
    todo: int
    current_batch: int | None
    status: str


@dataclass
class Commit:
    """Everything written in one transaction."""

    batches: list[tuple[BatchDone, int]] = field(default_factory=list)
    reducer_states: dict[int, tuple[int, tuple[bytes, ...]]] = field(default_factory=dict)
    metrics: list[tuple[int, int | None, int | None, MetricRecord]] = field(default_factory=list)
    errors: list[BatchFailed] = field(default_factory=list)
    progress: list[ProgressRow] = field(default_factory=list)
    log: tuple[float, int, int, int] | None = None
    segments: list[SegmentWritten] = field(default_factory=list)  # manifests of the batches' output segments

    def __bool__(self) -> bool:
        return bool(self.batches or self.reducer_states or self.metrics or self.errors or self.progress or self.log
                    or self.segments)


class StoreWriter:
    """Owns the store for one live run: lock, run row, commits.

    Example:
        >>> w = StoreWriter("nbbatch.duckdb")            # doctest: +SKIP
        >>> record = w.begin(spec)                       # doctest: +SKIP
    """

    def __init__(self, path: str, *, timeout: float = 60.0) -> None:
        self.path = os.path.abspath(path)
        self.timeout = timeout
        self._signer = Signer()  # signs launch info and reducer states; a resume verifies them
        self._lock: WriterLock | None = WriterLock(self.path)
        # Pay DuckDB's first-Arrow-scan imports (~0.3 s) now; a daemon killed inside DuckDB at exit aborts.
        threading.Thread(target=_warm_arrow_ingest, daemon=False, name="nbbatch-warm-up").start()
        self._writing: Any = writing(self.path)
        self._writing.__enter__()
        try:
            with self._open() as con:
                ensure_schema(con)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Release the store lock; the file itself is already closed between flushes."""
        if getattr(self, "_writing", None) is not None:
            self._writing.__exit__(None, None, None)
            self._writing = None
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _set_holder(self, what: str) -> None:
        if self._lock is not None:
            self._lock.describe(what)

    def _record_ended(self, con: duckdb.DuckDBPyConnection) -> None:
        """Store how runs left `running` ended: as the lock file's end record says (``lock.py``), else interrupted."""
        end = self._lock.previous_end if self._lock is not None else None
        stale = con.execute("SELECT run_id, name, pid, host, attempt FROM runs WHERE status = 'running'").fetchall()
        for run_id, name, pid, host, attempt in stale:
            if end is not None and (end.run_id, end.attempt) == (run_id, attempt):
                status, error, at = end.status, end.error, timestamp(end.at)
            else:
                status, error, at = Status.INTERRUPTED, interrupted_error(name, pid, host), None
            con.execute(
                "UPDATE runs SET status = ?, error = coalesce(?, error), "
                "finished_at = coalesce(?, finished_at, updated_at) WHERE run_id = ? AND status = ?",
                [status, error, at, run_id, Status.RUNNING],
            )
            con.execute("UPDATE progress SET status = ? WHERE run_id = ? AND status = 'running'", [status, run_id])
        if end is not None and self._lock is not None:
            self._lock.clear_end()

    @contextmanager
    def _open(self) -> Iterator[duckdb.DuckDBPyConnection]:
        try:
            with open_store(self.path, write=True, timeout=self.timeout) as con:
                yield con
        except StoreOpenError as exc:
            raise StoreError(str(exc)) from exc

    # -- runs -----------------------------------------------------------------------------------
    def begin(self, spec: RunSpec) -> RunRecord:
        """Create a run, or resume the named one; refuse a different fingerprint."""
        now = timestamp(time.time())
        with self._open() as con:
            self._record_ended(con)
            row = None
            if spec.name is not None:
                row = con.execute(
                    "SELECT run_id, status, processor, dataset_len, batch_size, max_batches, attempt, "
                    "planned_batches, output_dir FROM runs WHERE name = ? OR run_id = ?",
                    [spec.name, spec.name],
                ).fetchone()
            if row is None:
                run_id = uuid.uuid4().hex[:12]
                name = spec.name or time.strftime("run-%Y%m%d-%H%M%S-") + run_id[:4]
                output_dir = run_folder(spec.output_root, run_id)  # by id: names never become paths
                con.execute(
                    "INSERT INTO runs (run_id, name, status, processor, dataset_len, batch_size, max_batches, "
                    "checkpoint_interval, planned_batches, real_batches, world_size, attempt, done_at_start, "
                    "on_error, max_failures, output_dir, launch, config, host, pid, created_at, started_at, "
                    "updated_at) VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, 1, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        run_id, name, spec.processor, spec.dataset_len, spec.batch_size, spec.max_batches,
                        spec.checkpoint_interval, spec.planned_batches, spec.real_batches, spec.world_size,
                        spec.on_error, spec.max_failures, output_dir,
                        json.dumps(spec.launch) if spec.launch else None, json.dumps(jsonable(spec.config)),
                        socket.gethostname(), os.getpid(), now, now, now,
                    ],
                )
                self._signer.sign_launch(con, run_id, spec.launch)
                if spec.inputs is not None:
                    inputs.record(con, run_id, spec.inputs)
                segments.prepare(output_dir, 1)
                self._set_holder(repr(name))
                return RunRecord(run_id, name, "running", 1, spec.planned_batches, output_dir, frozenset(), (), 0)
            run_id, status, processor, dataset_len, batch_size, max_batches, attempt, planned, output_dir = row
            inputs.check(con, run_id, str(spec.name), self.path, spec.inputs)  # before dataset_len: names the cause
            stored = {"dataset_len": dataset_len, "batch_size": batch_size, "processor": processor, "max_batches": max_batches}
            given = {"dataset_len": spec.dataset_len, "batch_size": spec.batch_size, "processor": spec.processor, "max_batches": spec.max_batches}
            for key in ("dataset_len", "batch_size", "processor", "max_batches"):
                if stored[key] != given[key]:
                    raise ResumeMismatch(
                        f"run {spec.name!r} in `{self.path}` was started with {key}={stored[key]!r}, "
                        f"this call has {key}={given[key]!r}; pass the same {key} to resume it, or "
                        f"choose a new `run_name`",
                        field=key, stored=stored[key], given=given[key],
                    )
            name = con.execute("SELECT name FROM runs WHERE run_id = ?", [run_id]).fetchall()[0][0]
            done = frozenset(
                int(g) for (g,) in con.execute("SELECT global_batch FROM batches WHERE run_id = ?", [run_id]).fetchall()
            )
            # A resume runs code the store names: only records this user signed (or `trust`), never unpickled here.
            states = () if status == "done" else self._signer.resume_states(con, run_id, name, self.path, spec.trust)
            failures, columns = 0, output_columns(con, run_id)
            columns += tuple(c for c, _ in segments.columns(con, run_id) if c not in columns)
            if status == "done":
                return RunRecord(run_id, name, status, int(attempt), int(planned), output_dir, done, states, failures,
                                 columns)
            output_dir = run_folder(spec.output_root, run_id, output_dir)
            attempt = int(attempt) + 1
            con.execute(
                "UPDATE runs SET status = 'running', attempt = ?, world_size = ?, done_at_start = ?, error = NULL, "
                "on_error = ?, max_failures = ?, checkpoint_interval = ?, launch = coalesce(?, launch), host = ?, "
                "pid = ?, started_at = ?, updated_at = ?, finished_at = NULL, output_dir = ? WHERE run_id = ?",
                [
                    attempt, spec.world_size, len(done), spec.on_error, spec.max_failures, spec.checkpoint_interval,
                    json.dumps(spec.launch) if spec.launch else None, socket.gethostname(), os.getpid(), now, now,
                    output_dir, run_id,
                ],
            )
            self._signer.sign_launch(con, run_id, spec.launch)
            segments.sweep(con, run_id, output_dir)  # what a crash left uncommitted: never visible, now gone
            segments.prepare(output_dir, attempt)
            self._set_holder(repr(name))
            return RunRecord(run_id, name, "running", attempt, int(planned), output_dir, done, states, failures, columns)

    def finish(self, record: RunRecord, status: Status | str, reduced: dict[str, Any] | None, error: str | None) -> None:
        """Set the run's final status (``done``, ``failed``, ``preempted``).

        Raises:
            StoreError: the store refused it (a full disk); the end is then kept by `WriterLock.keep_end`.
        """
        status = Status(status)  # a typo must fail here, not leave a status no reader knows
        now = timestamp(time.time())
        try:
            with self._open() as con:
                con.execute(
                    "UPDATE runs SET status = ?, reduced_metrics = coalesce(?, reduced_metrics), error = ?, "
                    "updated_at = ?, finished_at = ? WHERE run_id = ?",
                    [status, json.dumps(jsonable(reduced)) if reduced is not None else None, error, now, now,
                     record.run_id],
                )
                con.execute(
                    "UPDATE progress SET status = CASE WHEN status = 'running' THEN ? ELSE status END "
                    "WHERE run_id = ? AND attempt = ?",
                    [status, record.run_id, record.attempt],
                )
        except duckdb.Error as exc:  # e.g. a full disk: say so, as `commit` does
            text = _explain_write(self.path, exc, record.name)
            where = keep_end(self._lock, End(record.run_id, record.attempt, status, error or text, time.time()))
            raise StoreError(f"could not store the final status of run {record.name!r}: {text}; {where}") from exc

    # -- commits --------------------------------------------------------------------------------
    def commit(self, record: RunRecord, commit: Commit) -> None:
        """Write one flush in one transaction: all of it lands, or none of it."""
        if not commit:
            return
        run_id = record.run_id
        now = time.time()
        try:
            with self._open() as con:
                con.execute("BEGIN TRANSACTION")
                try:
                    self._write(con, record, commit, now)
                    con.execute("UPDATE runs SET updated_at = ? WHERE run_id = ?", [timestamp(now), run_id])
                    con.execute("COMMIT")
                except BaseException:
                    # A failed COMMIT (full disk) already rolled back; don't hide it behind "no transaction".
                    with suppress(duckdb.Error):
                        con.execute("ROLLBACK")
                    raise
        except duckdb.Error as exc:
            raise StoreError(_explain_write(self.path, exc, record.name)) from exc
        except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
            raise StoreError(
                f"an output column changed type between batches ({exc}); return the same keys, dtypes "
                f"and per-sample shapes from every `process_batch` call (pad, or return Python lists "
                f"for ragged values)"
            ) from exc

    def _write(self, con: duckdb.DuckDBPyConnection, record: RunRecord, commit: Commit, now: float) -> None:
        run_id = record.run_id
        rows: list[dict[str, Any]]
        if commit.batches:
            rows = [
                {
                    "run_id": run_id, "global_batch": b.global_batch, "rank": b.rank, "batch_idx": b.batch_idx,
                    "attempt": record.attempt, "rows": b.rows, "first_index": first, "started_at": timestamp(b.started_at),
                    "seconds": b.seconds, "committed_at": timestamp(now),
                }
                for b, first in commit.batches
            ]
            self._insert(con, "batches", rows_table(rows, BATCH_SCHEMA))
            with_outputs = [
                (b.rank, b.batch_idx, b.global_batch, first, b.outputs) for b, first in commit.batches if b.outputs
            ]
            if with_outputs:
                insert_outputs(con, run_id, outputs_table(run_id, with_outputs))
        if commit.segments:
            segments.record(con, run_id, record.attempt, commit.segments, timestamp(now))
        if commit.metrics:
            self._insert(con, "metrics", rows_table(list(metric_rows(run_id, commit.metrics)), METRIC_SCHEMA))
        if commit.errors:
            rows = [
                {
                    "run_id": run_id, "attempt": record.attempt, "rank": e.rank, "global_batch": e.global_batch,
                    "batch_idx": e.batch_idx, "indices": list(e.indices), "exc_type": e.exc_type, "message": e.message,
                    "traceback": e.traceback, "fatal": e.fatal, "occurred_at": timestamp(e.t),
                }
                for e in commit.errors
            ]
            self._insert(con, "errors", rows_table(rows, ERROR_SCHEMA))
        for rank, (step, states) in sorted(commit.reducer_states.items()):
            self._signer.put_states(con, run_id, record.attempt, rank, step, states)
        if commit.progress:
            rows = [
                {
                    "run_id": run_id, "attempt": record.attempt, "rank": p.rank, "batches": p.batches, "rows": p.rows,
                    "failed": p.failed, "todo": p.todo, "current_batch": p.current_batch, "status": p.status,
                    "updated_at": timestamp(now),
                }
                for p in commit.progress
            ]
            con.register("_nbbatch_progress", rows_table(rows, PROGRESS_SCHEMA))
            con.execute("INSERT OR REPLACE INTO progress SELECT * FROM _nbbatch_progress")
            con.unregister("_nbbatch_progress")
        if commit.log is not None:
            t, batches, rows_done, committed = commit.log
            con.execute(
                "INSERT INTO progress_log VALUES (?, ?, ?, ?, ?, ?)",
                [run_id, record.attempt, timestamp(t), batches, rows_done, committed],
            )

    def _insert(self, con: duckdb.DuckDBPyConnection, table: str, data: pa.Table) -> None:
        con.register("_nbbatch_rows", data)
        # No `finally`: after a failed insert the transaction is aborted, so unregistering would
        # raise and hide the real error (e.g. a type mismatch); the caller's ROLLBACK drops the view.
        con.execute(f"INSERT INTO {ident(table)} BY NAME SELECT * FROM _nbbatch_rows")
        con.unregister("_nbbatch_rows")


def _warm_arrow_ingest() -> None:
    """Run one tiny Arrow scan on an in-memory database so its lazy imports happen now."""
    con = duckdb.connect()
    try:
        con.register("_warm", pa.table({"x": [1]}))
        con.execute("SELECT * FROM _warm").fetchall()
    finally:
        con.close()


def _explain_write(path: str, exc: BaseException, name: str) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    if "No space left" in text or "disk" in text.lower() and "full" in text.lower():
        return (
            f"the disk holding `{path}` is full ({text}) while committing run {name!r}; nothing of this "
            f"flush was written and committed batches are intact. Free space, then resume the run with "
            f"`run_name={name!r}`"
        )
    if "Conversion Error" in text or "Could not convert" in text or "cast" in text.lower():
        return (
            f"an output column does not match the type stored by earlier batches ({text}); return the "
            f"same dtypes and per-sample shapes from every `process_batch` call"
        )
    return f"writing to the store `{path}` failed ({text}); committed batches are intact, resume with `run_name={name!r}`"


