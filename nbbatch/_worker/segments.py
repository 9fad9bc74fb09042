"""A worker's output segments: each checkpoint step's outputs as one Parquet file, written off the compute thread.

The batch loop hands every finished batch's columns to `Segments`. At a checkpoint it seals them
into one job for a background thread, which builds the Arrow table, writes
``<name>.partial``, fsyncs it and renames it to ``_rows.segment_name(...)``; the loop meanwhile
runs the next batches. The loop collects finished writes (`Segments.ready`) and reports each as
a `SegmentWritten` event; the launcher commits it as the segment's manifest row in the same
transaction as the step's done marks, so a file no committed manifest names is never read (and
the next attempt deletes it). Whether to write segments at all is the launcher's decision, read
from the marker it puts into the folder (`settings`): a torchrun rank on a machine that cannot see
that folder ships its outputs to rank 0 inline, as before. Must not import DuckDB, ``_store``,
``_launch`` or ``_ui``.
"""

from __future__ import annotations

import errno
import json
import os
import threading
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from nbbatch._events import SegmentWritten
from nbbatch._rows import SEGMENT_FOLDER, marker_name, outputs_table, segment_name

__all__ = ["SegmentFailed", "Segments", "batch_bytes", "settings"]

#: Segments written but not yet reported; sealing another one waits (bounds memory when the disk lags).
MAX_IN_FLIGHT = 2
#: What `batch_bytes` counts per entry of a list column (a rough guess: a pointer and a small object).
LIST_ENTRY_BYTES = 16


class SegmentFailed(Exception):
    """Writing a segment failed (a full disk, a removed folder); the message says what to do."""


@dataclass(frozen=True)
class Settings:
    """The launcher's choice for this attempt: segments in ``folder``, batches under ``inline_bytes`` inline."""

    folder: str
    inline_bytes: int


def settings(output_dir: str, attempt: int) -> Settings | None:
    """The attempt's segment settings from the launcher's marker, or None to keep every output inline."""
    folder = os.path.join(output_dir, SEGMENT_FOLDER)
    try:
        with open(os.path.join(folder, marker_name(attempt)), encoding="utf-8") as handle:
            marker = json.load(handle)
    except (OSError, ValueError):
        return None  # another machine's folder, or segments turned off: ship outputs inline
    return Settings(folder, int(marker.get("inline_bytes", 0)))


def batch_bytes(columns: dict[str, Any]) -> int:
    """About how many bytes a batch's columns hold (numpy arrays exactly, lists by a rough guess)."""
    total = 0
    for values in columns.values():
        total += int(values.nbytes) if hasattr(values, "nbytes") else LIST_ENTRY_BYTES * len(values)
    return total


def _parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """How a segment is encoded (measured in benchmarks/README.md, "Segment encoding").

    Dictionary encoding only for strings (``run_id`` and text outputs); min/max statistics only for
    flat columns, where DuckDB uses them to skip row groups (``WHERE sample_index …``). On float
    vectors they cost about 15% of the encoding and select nothing.
    """
    return {
        "compression": "snappy",
        "use_dictionary": [f.name for f in schema if pa.types.is_string(f.type)],
        "write_statistics": [f.name for f in schema if not pa.types.is_nested(f.type)],
    }


class _ChecksumFile:
    """A new file that Parquet is encoded straight into, counting its bytes and their CRC-32 on the way.

    Saves the in-memory copy of the whole segment (and its regrowth) that a buffer would take.
    """

    closed = False

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.size = 0
        self.crc = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
        self.size += len(view)
        while view:
            view = view[os.write(self.fd, view):]
        return len(data)

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        pass

    def writable(self) -> bool:
        return True

    def sync(self) -> None:
        os.fsync(self.fd)

    def __enter__(self) -> _ChecksumFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed = True
        os.close(self.fd)


class Segments:
    """One worker's segment writer for one attempt.

    Example:
        >>> seg = Segments(settings, "ab12", attempt=1, rank=0)            # doctest: +SKIP
        >>> seg.add(global_batch, batch_idx, first_index, columns)         # doctest: +SKIP
        >>> seg.seal(step=5)                                                # doctest: +SKIP
    """

    def __init__(self, config: Settings, run_id: str, attempt: int, rank: int) -> None:
        self.config = config
        self.run_id, self.attempt, self.rank = run_id, attempt, rank
        self._pending: list[tuple[int, int, int, int, dict[str, Any]]] = []
        self._jobs: deque[tuple[int, list[tuple[int, int, int, int, dict[str, Any]]]]] = deque()
        self._done: list[SegmentWritten | BaseException] = []
        self._in_flight = 0
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, global_batch: int, batch_idx: int, first_index: int, columns: dict[str, Any]) -> None:
        """Keep a finished batch's columns for the step's segment."""
        self._pending.append((self.rank, batch_idx, global_batch, first_index, columns))

    def seal(self, step: int) -> bool:
        """Hand the step's batches to the writer thread; True if a segment (and its event) will follow."""
        if not self._pending:
            return False
        batches, self._pending = self._pending, []
        with self._cond:
            while self._in_flight >= MAX_IN_FLIGHT:
                self._cond.wait()
            self._in_flight += 1
            self._jobs.append((step, batches))
            self._cond.notify_all()
        if self._thread is None:
            # A daemon: a process leaving after a fatal error must not wait for a write nobody will commit.
            self._thread = threading.Thread(target=self._work, daemon=True, name=f"nbbatch-segments-rank{self.rank}")
            self._thread.start()
        return True

    def ready(self) -> list[SegmentWritten]:
        """Segments finished since the last call; raises `SegmentFailed` if a write failed."""
        with self._cond:
            done, self._done = self._done, []
        return self._check(done)

    def drain(self) -> list[SegmentWritten]:
        """Wait for every sealed segment; the events of those not reported yet."""
        with self._cond:
            while self._in_flight:
                self._cond.wait()
            done, self._done = self._done, []
        return self._check(done)

    @staticmethod
    def _check(done: list[SegmentWritten | BaseException]) -> list[SegmentWritten]:
        for item in done:
            if isinstance(item, BaseException):
                raise item
        return [item for item in done if isinstance(item, SegmentWritten)]

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._jobs:
                    self._cond.wait()
                step, batches = self._jobs.popleft()
            result: SegmentWritten | BaseException
            try:
                result = self._write(step, batches)
            except BaseException as exc:  # reported to the loop, which fails the run with it
                result = exc if isinstance(exc, SegmentFailed) else SegmentFailed(self._explain(exc))
            with self._cond:
                self._done.append(result)
                self._in_flight -= 1
                self._cond.notify_all()

    def _write(self, step: int, batches: list[tuple[int, int, int, int, dict[str, Any]]]) -> SegmentWritten:
        table = outputs_table(self.run_id, batches)
        name = segment_name(self.run_id, self.attempt, self.rank, step)
        os.makedirs(self.config.folder, exist_ok=True)
        final = os.path.join(self.config.folder, name)
        partial = final + ".partial"
        with _ChecksumFile(partial) as handle:
            pq.write_table(table, handle, **_parquet_options(table.schema))
            handle.sync()  # on disk before the store may name it in a committed manifest
        os.replace(partial, final)
        return SegmentWritten(
            rank=self.rank, step=step, file=name, rows=table.num_rows, nbytes=handle.size,
            checksum=f"crc32:{handle.crc:08x}", global_batches=tuple(b[2] for b in batches),
            schema=table.schema.serialize().to_pybytes(),
        )

    def _explain(self, exc: BaseException) -> str:
        folder = self.config.folder
        if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
            return (
                f"the disk holding `{folder}` is full while writing an output segment ({exc}); nothing of this "
                f"checkpoint was committed. Free space, then resume the run with the same `run_name`"
            )
        if isinstance(exc, (pa.ArrowInvalid, pa.ArrowTypeError)):
            return (
                f"an output column changed type between batches ({exc}); return the same keys, dtypes and "
                f"per-sample shapes from every `process_batch` call (pad, or return Python lists for ragged values)"
            )
        return (
            f"writing an output segment to `{folder}` failed ({type(exc).__name__}: {exc}); resume the run with the "
            f"same `run_name`"
        )
