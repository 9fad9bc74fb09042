"""Where a worker's events go: the `Sink` protocol the batch loop emits into, and `NotSent`.

Three sinks exist: a local worker's pipe (``entry.PipeSink``), a torchrun peer's buffer
(``distributed.PeerSink``) and torchrun rank 0's own supervisor (``_launch.lead``). Light on purpose
(no torch): ``entry`` imports it before the worker's environment is set. Must not import DuckDB,
``_store``, ``_launch`` or ``_ui``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from nbbatch._events import Event

if TYPE_CHECKING:
    from nbbatch._worker.collective import Coordinator

__all__ = ["NotSent", "Sink", "pickles"]


class NotSent(Exception):
    """An event could not be pickled, so nothing of it was sent; the cause is ``__cause__``."""


class Sink(Protocol):
    """Where a worker's events go.

    An optional class attribute, ``pickles = True``, says that `emit` pickles the event at once and
    raises `NotSent` before sending anything if it cannot (a pipe's). The loop then relies on that
    for a batch's outputs instead of pickling them once more to check them.
    """

    def emit(self, event: Event) -> None:
        """Send one event (non-blocking in spirit)."""
        ...

    def flush(self, coordinator: Coordinator) -> None:
        """Called on every rank right after each checkpoint event (a collective point)."""
        ...


def pickles(sink: Sink) -> bool:
    """Whether ``sink``'s `Sink.emit` pickles each event and raises `NotSent` when it cannot."""
    return bool(getattr(sink, "pickles", False))
