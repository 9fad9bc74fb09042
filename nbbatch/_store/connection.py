"""Opening the store file: retries on DuckDB's file lock, one shared instance per process.

DuckDB lets one process write a file, or many processes read it, never both at once. The run's
writer therefore opens the file only for the few milliseconds of each flush and closes it again,
and readers in other processes (the dashboard) open it read-only between flushes, retrying while
the writer holds the lock. Inside one process every connection to a file must use the same
configuration, so this module keeps at most one connection per file and upgrades it to
read-write when the local writer needs it.
"""

from __future__ import annotations

import os
import re
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import duckdb

from nbbatch._store.schema import DDL, NBBATCH_META, SCHEMA_VERSION, insert_sql

__all__ = [
    "OPEN_TIMEOUT_SECONDS", "StoreOpenError", "close_all", "ensure_schema", "open_store", "relation_connection", "writing",
]

#: How long opening the store waits for another process's DuckDB lock (or a read in this process) to go.
OPEN_TIMEOUT_SECONDS = 60.0
# Retries on a locked file start fast (a flush holds it for milliseconds) and back off to this.
_RETRY_FIRST_SECONDS = 0.005
_RETRY_MAX_SECONDS = 0.1
# How often a writer of this process looks whether its own readers finished their query.
_BUSY_POLL_SECONDS = 0.005

_LOCK_RE = re.compile(r"Could not set lock|Conflicting lock", re.IGNORECASE)
_guard = threading.RLock()


class StoreOpenError(Exception):
    """Raised with a user-facing message; ``_launch`` and ``_run`` turn it into StoreError."""


@dataclass
class _Entry:
    con: duckdb.DuckDBPyConnection
    read_only: bool
    users: int = 0


_entries: dict[str, _Entry] = {}
# Connections behind relations handed to users; weak, so a relation's file handle goes away with it.
_relation_cons: dict[str, list[weakref.ref[duckdb.DuckDBPyConnection]]] = {}
_writers: dict[str, int] = {}


def _key(path: str) -> str:
    return os.path.realpath(path)


def _connect(path: str, read_only: bool, timeout: float) -> duckdb.DuckDBPyConnection:
    """Connect, retrying while another process holds the file lock."""
    deadline = time.monotonic() + timeout
    delay = _RETRY_FIRST_SECONDS
    while True:
        try:
            return duckdb.connect(path, read_only=read_only)
        except duckdb.IOException as exc:
            text = str(exc)
            if _LOCK_RE.search(text) and time.monotonic() < deadline:
                time.sleep(delay)
                delay = min(delay * 2, _RETRY_MAX_SECONDS)
                continue
            raise StoreOpenError(_explain(path, text, read_only)) from exc
        except duckdb.Error as exc:
            raise StoreOpenError(_explain(path, str(exc), read_only)) from exc


def _explain(path: str, text: str, read_only: bool) -> str:
    if _LOCK_RE.search(text):
        pid = re.search(r"PID (\d+)", text)
        who = f"process {pid.group(1)}" if pid else "another process"
        return (
            f"the store `{path}` stayed locked by {who}; close that process's DuckDB connection "
            f"(e.g. `con.close()` in another notebook) or pass another `store=` path"
        )
    if "Read-only file system" in text or "Permission denied" in text:
        return f"cannot open the store `{path}` for writing ({text.splitlines()[0]}); pass `store=` a writable path"
    if "not a valid DuckDB database" in text or "orrupt" in text or "magic" in text:
        return (
            f"`{path}` is not a readable nbbatch store ({text.splitlines()[0]}); "
            f"move it away or pass another `store=` path"
        )
    if "No space left" in text:
        return f"the disk holding `{path}` is full ({text.splitlines()[0]}); free space, or pass another `store=` path"
    mode = "read" if read_only else "write"
    return f"cannot {mode} the store `{path}`: {text.splitlines()[0] if text else 'unknown error'}"


def _close_relation_connections(key: str) -> None:
    """Close read-only connections behind user relations so the local writer can open read-write."""
    for ref in _relation_cons.pop(key, []):
        con = ref()
        if con is not None:
            con.close()


@contextmanager
def open_store(path: str, *, write: bool, timeout: float = OPEN_TIMEOUT_SECONDS) -> Iterator[duckdb.DuckDBPyConnection]:
    """Yield a cursor on ``path``; read-write if ``write``, else whatever this process has open.

    The connection is closed again when its last user leaves, so other processes can get in.
    """
    key = _key(path)
    if not write and not os.path.exists(path):
        raise StoreOpenError(f"no store at `{path}`; run `torch_batch_process(..., store={path!r})` first")
    deadline = time.monotonic() + timeout
    while True:
        with _guard:
            entry = _entries.get(key)
            read_write = write or key in _writers
            if entry is not None and read_write and entry.read_only:
                if entry.users:
                    entry = None  # a reader of this process is mid-query: wait for it below
                    busy = True
                else:
                    entry.con.close()
                    del _entries[key]
                    entry, busy = None, False
            else:
                busy = False
            if not busy:
                if entry is None:
                    if read_write:
                        _close_relation_connections(key)
                    entry = _Entry(_connect(path, not read_write, timeout), read_only=not read_write)
                    _entries[key] = entry
                entry.users += 1
                cursor = entry.con.cursor()
                break
        if time.monotonic() > deadline:
            raise StoreOpenError(f"the store `{path}` stayed busy with a read in this process; retry when it is done")
        time.sleep(_BUSY_POLL_SECONDS)
    try:
        yield cursor
    finally:
        with _guard:
            try:
                cursor.close()
            except duckdb.Error:
                pass
            entry.users -= 1
            if entry.users == 0 and _entries.get(key) is entry:
                entry.con.close()
                del _entries[key]


def relation_connection(path: str, timeout: float = OPEN_TIMEOUT_SECONDS) -> duckdb.DuckDBPyConnection:
    """A connection of its own for relations handed to users (``Run.outputs()``).

    It lives as long as the relations made from it. While a run in this process writes the
    store it shares the writer's read-write database; otherwise it is read-only, and the local
    writer closes it before its next flush (such a relation then raises "connection closed").
    """
    if not os.path.exists(path):
        raise StoreOpenError(f"no store at `{path}`")
    key = _key(path)
    with _guard:
        if key in _writers:
            return _connect(path, False, timeout)
        con = _connect(path, True, timeout)
        refs = [r for r in _relation_cons.get(key, []) if r() is not None]
        refs.append(weakref.ref(con))
        _relation_cons[key] = refs
        return con


@contextmanager
def writing(path: str) -> Iterator[None]:
    """Mark ``path`` as written by this process (readers here then share the read-write config)."""
    key = _key(path)
    with _guard:
        _writers[key] = _writers.get(key, 0) + 1
    try:
        yield
    finally:
        with _guard:
            _writers[key] -= 1
            if not _writers[key]:
                del _writers[key]


def close_all(path: str | None = None) -> None:
    """Close cached connections (all, or the one for ``path``) so other processes can write."""
    with _guard:
        keys = list(_entries) if path is None else [_key(path)]
        for key in keys:
            entry = _entries.pop(key, None)
            if entry is not None:
                entry.con.close()
            _close_relation_connections(key)


def ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
    """Create missing tables and refuse a store written by an incompatible nbbatch."""
    con.execute(DDL)
    row = con.execute("SELECT value FROM nbbatch_meta WHERE key = 'schema_version'").fetchone()
    if row is None:
        con.execute(insert_sql(NBBATCH_META), ["schema_version", SCHEMA_VERSION])
    elif row[0] != SCHEMA_VERSION:
        raise StoreOpenError(
            f"the store was written by another nbbatch version (schema {row[0]}, this one reads "
            f"{SCHEMA_VERSION}); use a new `store=` path"
        )
