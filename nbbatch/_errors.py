"""The exception tree of nbbatch; it imports nothing from the package.

::

    NbbatchError
    ├── InvalidArgument (also ValueError)   bad argument; Determined's texts kept verbatim
    │   └── InvalidRunName                  a run name outside letters, digits and ``._-``
    ├── InvalidDataset (TypeError, ValueError) dataset without ``__len__`` and similar
    ├── WorkerFailed                        a worker raised or died; carries rank, batch, traceback
    │   └── WorkerDied                      killed by a signal, OOM, or exited without a word
    ├── RunFailed                           the run failed for a reason not tied to one batch
    ├── StoreError                          the DuckDB store cannot be used (busy, corrupt, read-only)
    │                                       or a resume meets records this user did not sign
    │   └── StoreBusy                       another live run holds the store
    ├── ResumeMismatch (also ValueError)    a resumed run's fingerprint differs; names the field
    └── RunNotFound (also KeyError)         no run with that name or id in the store
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "InvalidArgument",
    "InvalidDataset",
    "InvalidRunName",
    "NbbatchError",
    "ResumeMismatch",
    "RunFailed",
    "RunNotFound",
    "StoreBusy",
    "StoreError",
    "WorkerDied",
    "WorkerFailed",
]


class NbbatchError(Exception):
    """Root of every error nbbatch raises on purpose."""


class InvalidArgument(NbbatchError, ValueError):
    """An argument of `torch_batch_process` (or the magic/CLI) is invalid."""


class InvalidRunName(InvalidArgument):
    """A run name is not letters, digits and ``._-`` (or starts with ``-`` or ``.``); the message gives the rule."""


class InvalidDataset(NbbatchError, TypeError, ValueError):
    """The dataset cannot be sharded, e.g. it has no ``__len__``."""


class WorkerFailed(NbbatchError):
    """A worker raised in user code or died; the run is marked failed and can be resumed.

    Attributes:
        rank: the worker's rank.
        batch_idx: the per-worker batch index being processed, or None outside a batch.
        global_batch: the global batch number, or None outside a batch.
        indices: the dataset indices of that batch.
        remote_traceback: the worker's formatted traceback text.
        run_name: the run to resume with ``run_name=``.
    """

    def __init__(
        self,
        message: str,
        *,
        rank: int | None = None,
        batch_idx: int | None = None,
        global_batch: int | None = None,
        indices: Sequence[int] = (),
        remote_traceback: str = "",
        run_name: str | None = None,
    ) -> None:
        self.rank = rank
        self.batch_idx = batch_idx
        self.global_batch = global_batch
        self.indices = list(indices)
        self.remote_traceback = remote_traceback
        self.run_name = run_name
        self.message = message
        super().__init__(message)

    def __str__(self) -> str:
        parts = [self.message]
        if self.remote_traceback:
            parts.append("\n--- remote traceback (rank %s) ---\n%s" % (self.rank, self.remote_traceback.rstrip()))
        return "".join(parts)

    def __reduce__(self) -> tuple[object, ...]:
        # Keep keyword attributes across pickling (e.g. a run in a background thread).
        return (_rebuild_worker_failed, (type(self), self.message, self.__dict__))


def _rebuild_worker_failed(cls: type[WorkerFailed], message: str, state: dict[str, object]) -> WorkerFailed:
    """Rebuild a pickled WorkerFailed subclass with its attributes."""
    err = cls.__new__(cls)
    Exception.__init__(err, message)
    err.__dict__.update(state)
    return err


class WorkerDied(WorkerFailed):
    """A worker process ended without reporting an error (signal, OOM killer, ``os._exit``)."""


class RunFailed(NbbatchError):
    """The run failed for a reason not tied to a single batch (e.g. too many skipped failures)."""


class StoreError(NbbatchError):
    """The DuckDB store cannot be opened, read or written."""


class StoreBusy(StoreError):
    """Another live run is writing to the same store."""


class ResumeMismatch(NbbatchError, ValueError):
    """A named run exists with a different fingerprint.

    Attributes:
        field: the first differing fingerprint field.
        stored: the value stored with the run.
        given: the value of this call.
    """

    def __init__(self, message: str, *, field: str, stored: object, given: object) -> None:
        self.field = field
        self.stored = stored
        self.given = given
        super().__init__(message)

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_mismatch, (str(self), self.field, self.stored, self.given))


def _rebuild_mismatch(message: str, field: str, stored: object, given: object) -> ResumeMismatch:
    """Rebuild a pickled ResumeMismatch."""
    return ResumeMismatch(message, field=field, stored=stored, given=given)


class RunNotFound(NbbatchError, KeyError):
    """No run with the given name or id exists in the store."""

    def __str__(self) -> str:
        # KeyError quotes its argument; show the message as written.
        return str(self.args[0]) if self.args else ""
