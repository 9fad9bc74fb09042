"""The store's writer lock: one live writer per store, and whether a ``running`` run still has one.

One process writes a store at a time (the launcher, or rank 0 under torchrun). It holds an
exclusive lock on the sidecar file ``<store>.lock`` for its whole life, and the kernel drops the
lock when that process ends, however it ends (SIGKILL, the OOM killer, a dead kernel). A run whose
row says ``running`` while nobody holds the lock therefore lost its launcher: readers report it as
``interrupted`` (`resolve_status`), and the next writer of the store records that
(``StoreWriter.begin``).

Why open-file-description locks (``F_OFD_SETLK`` / ``F_OFD_GETLK``, Linux 3.15+):

- Readers ask "is it held?" without taking the lock. With ``flock`` the only way to ask is to try
  to take it, and a reader holding it for that moment makes a writer that starts then fail with
  `StoreBusy`. ``F_OFD_GETLK`` only looks.
- Unlike classic POSIX record locks, an OFD lock belongs to the open file, not to the process: a
  query from the writer's own process (a notebook reading its own run) sees it, and a reader that
  closes its descriptor never drops the writer's lock.
- The lock lasts until the last descriptor of its open file closes. Workers forked from the
  writer's process would keep it alive after the writer died, so the descriptor is close-on-exec
  and forked children close their copy (`os.register_at_fork`).

Without OFD locks (macOS) the writer falls back to ``flock`` and `writer_alive` answers None
("cannot tell"): a dead launcher's run then shows ``running`` until the next writer records it.

The sidecar is opened with ``O_NOFOLLOW`` (a symlink there is refused and its target left alone)
and is never truncated. The holder's description (``run 'x', pid 12 on host``, shown by
`StoreBusy`) is written as one fixed-size record at offset 0, and only into a regular file with a
single link that is empty or already holds such a record; any other file is locked but not written.

The run's end, when the store cannot take it (a full disk). A writer that hits a full disk raises
the disk-full `StoreError`, and must still record the run as ``failed`` with that error; but the
one-row UPDATE that says so needs the same full disk (measured with DuckDB 2.0.1 on a full tmpfs:
it fails with "No space left on device" while appending to the WAL; with 64 KiB freed it
succeeds and takes one 4 KiB WAL page, and the checkpoint on close wants one more 256 KiB block,
which it skips quietly when short of room). So the end is kept where writing it allocates
nothing: an "end" slot of `_END_SIZE` bytes after the holder record, filled (allocated) when the
lock is taken, and overwritten in place by `WriterLock.record_end` only when the store refused
the final status. Readers (`ended`, used by ``reader.py``) report a ``running`` row whose lock
nobody holds with the status and error of a matching end record (same run id and attempt)
instead of ``interrupted``; the next writer of the store persists it into the database and clears
the slot (``StoreWriter.begin``). Rejected alternative: a preallocated ``<store>.reserve`` file
freed on ENOSPC. Freed space goes to whichever process writes next (the program that filled the
disk keeps writing), a reserve cannot be made on a disk that is already nearly full, and on
copy-on-write or compressing file systems ``posix_fallocate`` reserves nothing. Overwriting bytes
of an allocated block needs no new block on ext4, xfs and tmpfs; on copy-on-write file systems
(btrfs, ZFS) it may, and then the run shows ``interrupted`` (still resumable) and a warning says
why.
Must not import anything from nbbatch but ``_errors`` and ``_events``.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
import stat
import struct
import weakref
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from nbbatch._errors import StoreBusy, StoreError
from nbbatch._events import Status

__all__ = ["End", "WriterLock", "ended", "interrupted_error", "keep_end", "lock_path", "resolve_status", "writer_alive"]

#: ``struct flock`` on 64-bit Linux: l_type, l_whence, l_start, l_len, l_pid (+ padding).
_FLOCK = struct.Struct("hhqqi4x")
_OFD = hasattr(fcntl, "F_OFD_SETLK") and hasattr(fcntl, "F_OFD_GETLK")
_RECORD = 256
_MARKER = "nbbatch writer lock\n"
_END_SIZE = 4096 - _RECORD  # the holder record and the end slot fill one page (one block on common file systems)
_END_MARKER = b"nbbatch run ended\n"
# What earlier versions wrote (one line, no marker); such a file is ours to update.
_OLD_RECORD = re.compile(r"\Arun .{1,200}, pid \d+ on [\w.-]*\s*\Z", re.DOTALL)
_BUSY = (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)


def lock_path(store: str) -> str:
    """The sidecar of ``store``, beside the real file (a store reached through a symlink has one lock)."""
    return os.path.realpath(store) + ".lock"


def _flock(kind: int) -> bytes:
    return _FLOCK.pack(kind, os.SEEK_SET, 0, 0, 0)  # the whole file


def writer_alive(store: str) -> bool | None:
    """Whether a process holds the writer lock of ``store`` now; None when this cannot be told.

    It only queries the lock (``F_OFD_GETLK``), so it never delays or refuses a starting writer.
    """
    if not _OFD:
        return None
    try:
        fd = os.open(lock_path(store), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return False  # no writer ever ran here, or the store was copied without its sidecar
    except OSError as exc:
        # A symlink or special file there: no writer can hold it, since writers refuse both.
        return False if exc.errno == errno.ELOOP else None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _flock(fcntl.F_WRLCK))
        return bool(_FLOCK.unpack(answer)[0] != fcntl.F_UNLCK)
    except OSError:  # e.g. a file system without lock support: do not claim anything
        return None
    finally:
        os.close(fd)


def resolve_status(stored: str, alive: bool | None) -> Status:
    """The status readers report: ``running`` without a live writer is ``interrupted``.

    Raises:
        StoreError: ``stored`` is not a status this nbbatch knows.
    """
    try:
        status = Status(stored)
    except ValueError:
        raise StoreError(
            f"the store holds a run with the unknown status {stored!r}; it was written by another nbbatch "
            f"version or edited by hand; read it with that version, or pass another `store=`"
        ) from None
    return Status.INTERRUPTED if status is Status.RUNNING and alive is False else status


@dataclass(frozen=True)
class End:
    """How a writer ended a run whose final status the store refused (see the module docstring)."""

    run_id: str
    attempt: int
    status: Status
    error: str | None
    at: float  # time.time() when it ended


def ended(store: str) -> End | None:
    """The end record in the sidecar of ``store``, if a writer left one there (None otherwise)."""
    try:
        fd = os.open(lock_path(store), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        return _parse_end(os.pread(fd, _END_SIZE, _RECORD)) if stat.S_ISREG(os.fstat(fd).st_mode) else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _parse_end(raw: bytes) -> End | None:
    if not raw.startswith(_END_MARKER):
        return None
    try:
        data = json.loads(raw[len(_END_MARKER):].decode("utf-8"))
        error = data["error"]
        return End(str(data["run_id"]), int(data["attempt"]), Status(data["status"]),
                   None if error is None else str(error), float(data["at"]))
    except (ValueError, KeyError, TypeError):  # torn or foreign bytes: no claim
        return None


def _end_bytes(end: End) -> bytes:
    """The slot's bytes for ``end``: JSON after the marker, the error shortened until it fits."""
    error = end.error
    while True:
        body = json.dumps({"run_id": end.run_id, "attempt": end.attempt, "status": str(end.status),
                           "error": error, "at": end.at})
        data = _END_MARKER + body.encode("utf-8")
        if len(data) < _END_SIZE or not error:
            return data[: _END_SIZE - 1].ljust(_END_SIZE - 1) + b"\n"
        error = error[: len(error) * 9 // 10 - 1] + "…"


def keep_end(lock: WriterLock | None, end: End) -> str:
    """Keep the end of a run whose store refused its final status in the lock file; say where, for the error.

    A ``done`` run is kept as ``failed``: its reduced metrics did not reach the store, a resume makes them.
    """
    if end.status is not Status.PREEMPTED:
        end = End(end.run_id, end.attempt, Status.FAILED, end.error, end.at)
    if lock is not None and lock.record_end(end):
        return f"its end ({end.status}) is kept in `{lock.path}` and shown by readers until the store has room again"
    return "its end could not be recorded either, so readers will show the run as interrupted"


def interrupted_error(name: str, pid: Any, host: Any) -> str:
    """Why an interrupted run stopped, for its ``error`` field."""
    return (
        f"the launcher of run {name!r} (pid {pid} on {host}) ended without marking the run: it was killed "
        f"(SIGKILL, the OOM killer) or its kernel died. Committed batches are kept; resume it with "
        f"`run_name={name!r}` (or `nbbatch resume {name}` for runs started by `nbbatch run`)"
    )


class WriterLock:
    """The exclusive writer lock of one store, held from construction until `release`.

    Args:
        store: path of the DuckDB store (its folder is created if missing).

    Raises:
        StoreBusy: another live process holds the lock.
        StoreError: the sidecar cannot be created or opened, is a symlink, or is not a regular file.

    Example:
        >>> lock = WriterLock("nbbatch.duckdb")   # doctest: +SKIP
        >>> lock.describe("'my-run'"); lock.release()   # doctest: +SKIP
    """

    def __init__(self, store: str) -> None:
        self.store = os.path.abspath(store)
        self.path = lock_path(self.store)
        self._fd: int | None = None
        fd, created = self._open()
        try:
            _take(fd)
        except OSError as exc:
            holder = _holder(fd)
            os.close(fd)
            if exc.errno in _BUSY:
                raise StoreBusy(
                    f"the store `{self.store}` is in use by a live run ({holder}); wait for it to end, "
                    f"stop it (`nbbatch.open_run(...).stop()`), or pass another `store=` path"
                ) from None
            raise StoreError(f"cannot lock `{self.path}` ({exc.strerror}); pass `store=` a path on a local disk") from exc
        self._fd = fd
        self._writable = created or _is_ours(fd)
        _held.add(self)
        self.describe("starting")
        #: What the previous writer left in the end slot; ``StoreWriter.begin`` persists it, then clears it.
        self.previous_end = _parse_end(self._end_slot())
        self._fill_end_slot(self._end_slot())  # allocate the slot now, while the disk has room

    def _open(self) -> tuple[int, bool]:
        """Open the sidecar without following a symlink; tell whether this call created it."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            for _ in range(3):  # a sidecar removed between the two opens: create it again
                try:
                    fd, created = os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o666), True
                except FileExistsError:
                    try:
                        fd, created = os.open(self.path, flags), False
                    except FileNotFoundError:
                        continue
                break
            else:
                raise OSError(errno.ENOENT, "the lock file keeps disappearing")
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StoreError(
                    f"the lock file `{self.path}` is a symbolic link; nbbatch does not follow it (the file it "
                    f"points to is left untouched). Remove the link (`rm {self.path}`) and start the run again"
                ) from exc
            raise StoreError(
                f"cannot write to the store `{self.store}` ({exc.strerror}); pass `store=` a writable path"
            ) from exc
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise StoreError(
                f"the lock file `{self.path}` is not a regular file; remove it (`rm {self.path}`) and start the "
                f"run again"
            )
        return fd, created

    def describe(self, what: str) -> None:
        """Record who holds the lock (``run 'name'``), for the `StoreBusy` message of others."""
        if self._fd is None or not self._writable:
            return
        text = f"{_MARKER}run {what}, pid {os.getpid()} on {socket.gethostname()}"
        data = text.encode("utf-8", "replace")[: _RECORD - 1].ljust(_RECORD - 1) + b"\n"
        with suppress(OSError):  # informational only; a full disk must not break the locking
            os.pwrite(self._fd, data, 0)

    def _end_slot(self) -> bytes:
        if self._fd is None or not self._writable:
            return b""
        try:
            return os.pread(self._fd, _END_SIZE, _RECORD)
        except OSError:
            return b""

    def _fill_end_slot(self, data: bytes) -> bool:
        """Overwrite the end slot in place (the holder record is always there before it)."""
        if self._fd is None or not self._writable:
            return False
        try:
            return os.pwrite(self._fd, data.ljust(_END_SIZE), _RECORD) == _END_SIZE
        except OSError:
            return False

    def record_end(self, end: End) -> bool:
        """Keep ``end`` in the sidecar, for readers, until the next writer stores it; False if it could not be."""
        return self._fill_end_slot(_end_bytes(end))

    def clear_end(self) -> None:
        """Empty the end slot once its record is in the database."""
        self.previous_end = None
        self._fill_end_slot(b"")

    def release(self) -> None:
        """Drop the lock (idempotent); the sidecar stays, so the next writer locks the same file."""
        fd, self._fd = self._fd, None
        _held.discard(self)
        if fd is not None:
            try:
                if _OFD:
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_UNLCK))
            finally:
                os.close(fd)

    def __del__(self) -> None:
        # A writer dropped without `close()` must not keep the store locked for the process's life.
        with suppress(Exception):
            self.release()

    def _forget(self) -> None:
        """In a forked child: close the inherited descriptor, so the lock dies with the writer."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with suppress(OSError):
                os.close(fd)


def _take(fd: int) -> None:
    if _OFD:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _flock(fcntl.F_WRLCK))
    else:  # pragma: no cover - macOS
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _is_ours(fd: int) -> bool:
    """A file this module may write into: regular, one link, empty or holding a holder record."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        return False
    head = os.pread(fd, _RECORD + 1, 0).decode("utf-8", "replace")
    return not head or head.startswith(_MARKER) or bool(_OLD_RECORD.match(head))


def _holder(fd: int) -> str:
    try:
        head = os.pread(fd, _RECORD, 0).decode("utf-8", "replace")
    except OSError:
        return "another process"
    if head.startswith(_MARKER):
        return head[len(_MARKER):].strip() or "another process"
    return head.strip() if _OLD_RECORD.match(head) else "another process"


_held: weakref.WeakSet[WriterLock] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for lock in list(_held):
        lock._forget()
    _held.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
