"""The store's only writer: creates and resumes runs and commits checkpoints in one transaction.

One process per store writes (the launcher, or rank 0 under torchrun). Its `WriterLock` on the
sidecar ``<store>.lock`` keeps a second live run out with a clear error and tells readers that its
run is alive (``_store/lock.py``); the DuckDB file itself is opened only for each flush, so
dashboards in other processes can read between flushes. What a flush writes is ``flush.py``; the
records passed in and out are ``records.py`` (re-exported here).
Must not import anything from nbbatch but ``_events``, ``_errors``, ``_plan`` and ``_store``.
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
from typing import Any

import duckdb
import pyarrow as pa

from nbbatch._errors import ResumeMismatch, StoreError
from nbbatch._events import Status
from nbbatch._plan import Fingerprint
from nbbatch._store import flush, inputs, segments
from nbbatch._store.arrow import jsonable, timestamp
from nbbatch._store.columns import output_columns
from nbbatch._store.connection import OPEN_TIMEOUT_SECONDS, StoreOpenError, ensure_schema, open_store, writing
from nbbatch._store.lock import End, WriterLock, interrupted_error, keep_end, resolve_status
from nbbatch._store.records import Commit, RunRecord, RunSpec
from nbbatch._store.schema import RUNS, insert_sql, run_folder
from nbbatch._store.sql import ident
from nbbatch._store.trust import Signer

__all__ = ["StoreWriter"]

# What `begin` reads of a stored run: its identity and state, then its fingerprint.
_STORED = ("run_id", "name", "status", "attempt", "planned_batches", "output_dir", *Fingerprint.names())


class StoreWriter:
    """Owns the store for one live run: lock, run row, commits.

    Example:
        >>> w = StoreWriter("nbbatch.duckdb")            # doctest: +SKIP
        >>> record = w.begin(spec)                       # doctest: +SKIP
    """

    def __init__(self, path: str, *, timeout: float = OPEN_TIMEOUT_SECONDS) -> None:
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
        stale = con.execute(
            "SELECT run_id, name, pid, host, attempt FROM runs WHERE status = ?", [Status.RUNNING]
        ).fetchall()
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
            con.execute(
                "UPDATE progress SET status = ? WHERE run_id = ? AND status = ?", [status, run_id, Status.RUNNING]
            )
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
        with self._open() as con:
            self._record_ended(con)
            stored = None
            if spec.name is not None:
                cur = con.execute(
                    f"SELECT {', '.join(ident(c) for c in _STORED)} FROM runs WHERE name = ? OR run_id = ?",
                    [spec.name, spec.name],
                )
                row = cur.fetchone()
                stored = None if row is None else dict(zip(_STORED, row))
            if stored is None:
                return self._create(con, spec)
            return self._resume(con, spec, stored)

    def _create(self, con: duckdb.DuckDBPyConnection, spec: RunSpec) -> RunRecord:
        """Insert a new run's row (attempt 1) and prepare its folder."""
        now = timestamp(time.time())
        run_id = uuid.uuid4().hex[:12]
        name = spec.name or time.strftime("run-%Y%m%d-%H%M%S-") + run_id[:4]
        output_dir = run_folder(spec.output_root, run_id)  # by id: names never become paths
        row = {
            "run_id": run_id, "name": name, "status": Status.RUNNING, "processor": spec.processor,
            "dataset_len": spec.dataset_len, "batch_size": spec.batch_size, "max_batches": spec.max_batches,
            "checkpoint_interval": spec.checkpoint_interval, "planned_batches": spec.planned_batches,
            "real_batches": spec.real_batches, "world_size": spec.world_size, "attempt": 1, "done_at_start": 0,
            "on_error": spec.on_error, "max_failures": spec.max_failures, "output_dir": output_dir,
            "launch": json.dumps(spec.launch) if spec.launch else None,
            # Options that have a column of their own are stored there only; readers find them there.
            "config": json.dumps(jsonable({k: v for k, v in spec.config.items() if k not in RUNS.names})),
            "host": socket.gethostname(), "pid": os.getpid(), "created_at": now, "started_at": now, "updated_at": now,
        }
        con.execute(insert_sql(RUNS, row), list(row.values()))
        self._signer.sign_launch(con, run_id, spec.launch)
        if spec.inputs is not None:
            inputs.record(con, run_id, spec.inputs)
        segments.prepare(output_dir, 1)
        self._set_holder(repr(name))
        return RunRecord(run_id, name, Status.RUNNING, 1, spec.planned_batches, output_dir, frozenset(), ())

    def _resume(self, con: duckdb.DuckDBPyConnection, spec: RunSpec, stored: dict[str, Any]) -> RunRecord:
        """Check the stored run against ``spec``, then return it as is (done) or start its next attempt."""
        run_id, name = str(stored["run_id"]), str(stored["name"])
        inputs.check(con, run_id, str(spec.name), self.path, spec.inputs)  # before dataset_len: names the cause
        self._check_fingerprint(spec, stored)
        status = resolve_status(str(stored["status"]), None)
        done = frozenset(
            int(g) for (g,) in con.execute("SELECT global_batch FROM batches WHERE run_id = ?", [run_id]).fetchall()
        )
        # A resume runs code the store names: only records this user signed (or `trust`), never unpickled here.
        states = () if status is Status.DONE else self._signer.resume_states(con, run_id, name, self.path, spec.trust)
        columns = output_columns(con, run_id)
        columns += tuple(c for c, _ in segments.columns(con, run_id) if c not in columns)
        planned = int(stored["planned_batches"])
        if status is Status.DONE:
            return RunRecord(run_id, name, status, int(stored["attempt"]), planned, str(stored["output_dir"]), done,
                             states, columns)
        output_dir = run_folder(spec.output_root, run_id, stored["output_dir"])
        attempt, now = int(stored["attempt"]) + 1, timestamp(time.time())
        con.execute(
            "UPDATE runs SET status = ?, attempt = ?, world_size = ?, done_at_start = ?, error = NULL, "
            "on_error = ?, max_failures = ?, checkpoint_interval = ?, launch = coalesce(?, launch), host = ?, "
            "pid = ?, started_at = ?, updated_at = ?, finished_at = NULL, output_dir = ? WHERE run_id = ?",
            [
                Status.RUNNING, attempt, spec.world_size, len(done), spec.on_error, spec.max_failures,
                spec.checkpoint_interval, json.dumps(spec.launch) if spec.launch else None, socket.gethostname(),
                os.getpid(), now, now, output_dir, run_id,
            ],
        )
        self._signer.sign_launch(con, run_id, spec.launch)
        segments.sweep(con, run_id, output_dir)  # what a crash left uncommitted: never visible, now gone
        segments.prepare(output_dir, attempt)
        self._set_holder(repr(name))
        return RunRecord(run_id, name, Status.RUNNING, attempt, planned, output_dir, done, states, columns)

    def _check_fingerprint(self, spec: RunSpec, stored: dict[str, Any]) -> None:
        """Raise `ResumeMismatch` on the first fingerprint field where ``spec`` differs from the stored run."""
        difference = Fingerprint(**{k: stored[k] for k in Fingerprint.names()}).first_difference(spec.fingerprint)
        if difference is None:
            return
        key, was, given = difference
        raise ResumeMismatch(
            f"run {spec.name!r} in `{self.path}` was started with {key}={was!r}, "
            f"this call has {key}={given!r}; pass the same {key} to resume it, or "
            f"choose a new `run_name`",
            field=key, stored=was, given=given,
        )

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
                    "UPDATE progress SET status = CASE WHEN status = ? THEN ? ELSE status END "
                    "WHERE run_id = ? AND attempt = ?",
                    [Status.RUNNING, status, record.run_id, record.attempt],
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
        """Insert the flush's rows (a method, so the fault matrix can kill the process right after it)."""
        flush.write(con, record, commit, now, self._signer)


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


