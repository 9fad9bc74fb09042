"""The worker side of a torchrun world: joining the group, shipping events, live counters, aborts.

Under torchrun every process is one worker and rank 0 writes the store. Other ranks keep their
events in a `PeerSink` and ship them to rank 0 at each checkpoint (``gather_object`` on a gloo
group, a collective point every rank reaches). Between checkpoints a `PeerWatcher` thread puts the
rank's counters into torch.distributed's own key-value store (the c10d TCPStore torchrun already
runs) every `POLL_SECONDS`, so rank 0 can show live progress. A segment's manifest goes into that
store as soon as the segment is written, so the loop never waits for the write and a step's
commit does not wait for the next checkpoint. A fatal error goes into that store at once: every
rank's watcher sees it within a poll, unwinds at its next event, and leaves the process after a
grace period if a collective keeps it stuck, so no rank hangs.
Must not import DuckDB, ``_store``, ``_launch`` or ``_ui``.
"""

from __future__ import annotations

import datetime as dt
import os
import pickle
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from nbbatch._events import BatchFailed, Event, SegmentWritten
from nbbatch._worker.collective import Coordinator
from nbbatch._worker.tally import Current, Tally, WorkerStatus

__all__ = [
    "ABORT_GRACE_SECONDS",
    "EXIT_ABORTED",
    "POLL_SECONDS",
    "Channel",
    "Counters",
    "PeerSink",
    "PeerWatcher",
    "RemoteFailure",
    "exit_later",
    "join_group",
]

#: How often a rank publishes its counters and looks for other ranks' errors (rank 0's flusher too).
POLL_SECONDS = 0.5
#: How long a rank that learnt of another rank's failure may stay stuck before it leaves (``$NBBATCH_ABORT_GRACE``).
ABORT_GRACE_SECONDS = float(os.environ.get("NBBATCH_ABORT_GRACE", "10"))
#: How often `Channel.wait_ack` looks for rank 0's acknowledgement.
ACK_POLL_SECONDS = 0.05
#: How long ranks wait for each other in a collective of our groups.
GROUP_TIMEOUT = dt.timedelta(minutes=30)
#: The exit code of a rank that `exit_later` ends.
EXIT_ABORTED = 1


@dataclass(frozen=True)
class Counters:
    """One rank's totals in the current attempt; ``seq`` orders snapshots, ``t`` is a heartbeat.

    ``segments`` counts the segment manifests the rank published (`Channel.publish_segment`).
    """

    seq: int
    done: int
    rows: int
    failed: int
    current: Current | None
    status: WorkerStatus
    t: float
    segments: int = 0

    @classmethod
    def of(cls, seq: int, tally: Tally, t: float, segments: int = 0) -> Counters:
        """The snapshot of ``tally`` numbered ``seq`` and taken at ``t``."""
        return cls(seq, tally.done, tally.rows, tally.failed, tally.current, tally.status, t, segments)

    def tally(self) -> Tally:
        """The totals, as the `Tally` rank 0 keeps for this rank."""
        return Tally(self.done, self.rows, self.failed, self.current, self.status)


class RemoteFailure(Exception):
    """Another rank failed fatally; raised at this rank's next event to leave the batch loop."""

    def __init__(self, event: BatchFailed) -> None:
        self.event = event
        super().__init__(f"rank {event.rank} failed: {event.exc_type}: {event.message}")


def join_group(local_rank: int) -> tuple[Any, bool]:
    """Join (or reuse) the default process group; returns our object group and whether we created the default.

    On GPUs the default group is NCCL (for the user's tensors) and our collectives use a separate
    gloo group over CPU tensors; on CPU the gloo default group serves both.
    """
    import torch
    import torch.distributed as dist

    cuda = torch.cuda.is_available() and torch.cuda.device_count() > local_rank
    if cuda:
        torch.cuda.set_device(local_rank)
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=GROUP_TIMEOUT)
        created = True
    group = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=GROUP_TIMEOUT)
    return group, created


class Channel:
    """Keys of one attempt in the c10d store.

    ``progress/<rank>``, ``error/<publisher>``, ``ack/<publisher>``, and ``segment/<rank>/<n>``:
    a rank's n-th segment manifest, set before the rank's counters say it published n, and
    deleted by rank 0 once read (a long run does not pile them up in torchrun's store).

    Example:
        >>> ch = Channel(dist.distributed_c10d._get_default_store(), "ab12", 1, 2)   # doctest: +SKIP
        >>> ch.publish_error(event)                                                # doctest: +SKIP
    """

    def __init__(self, store: Any, run_id: str, attempt: int, world_size: int) -> None:
        self.store = store
        self.prefix = f"nbbatch/{run_id}/{attempt}/"
        self.world_size = world_size
        self._lock = threading.Lock()
        self._seen_progress: set[int] = set()
        self._segments_read: dict[int, int] = {}  # by rank 0, per publishing rank

    def _key(self, *parts: object) -> str:
        return self.prefix + "/".join(str(p) for p in parts)

    def publish_progress(self, rank: int, counters: Counters) -> None:
        """Overwrite this rank's counters."""
        with self._lock:
            self.store.set(self._key("progress", rank), pickle.dumps(counters))

    def read_progress(self, ranks: range) -> dict[int, Counters]:
        """The latest counters of every rank in ``ranks`` that has published any."""
        with self._lock:
            for rank in ranks:
                if rank not in self._seen_progress and self.store.check([self._key("progress", rank)]):
                    self._seen_progress.add(rank)
            present = [r for r in ranks if r in self._seen_progress]
            if not present:
                return {}
            blobs = self.store.multi_get([self._key("progress", r) for r in present])
        return {r: pickle.loads(b) for r, b in zip(present, blobs)}

    def publish_segment(self, rank: int, n: int, event: SegmentWritten) -> None:
        """Hand this rank's ``n``-th segment manifest to rank 0 (which commits it with its step)."""
        with self._lock:
            self.store.set(self._key("segment", rank, n), pickle.dumps(event))

    def read_segments(self, published: dict[int, int]) -> list[SegmentWritten]:
        """The manifests not read yet of ``published`` (rank -> how many it published), oldest first per rank."""
        with self._lock:
            keys = [self._key("segment", rank, n) for rank, count in sorted(published.items())
                    for n in range(self._segments_read.get(rank, 0) + 1, count + 1)]
            if not keys:
                return []
            blobs = self.store.multi_get(keys)
            for key in keys:
                self.store.delete_key(key)
            for rank, count in published.items():
                self._segments_read[rank] = max(count, self._segments_read.get(rank, 0))
        return [pickle.loads(b) for b in blobs]

    def publish_error(self, publisher: int, event: BatchFailed) -> None:
        """Announce a fatal error to every rank (first error per publisher wins)."""
        with self._lock:
            key = self._key("error", publisher)
            if not self.store.check([key]):
                self.store.set(key, pickle.dumps(event))
                self.store.add(self._key("errors"), 1)

    def error_count(self) -> int:
        """How many ranks published an error (a cheap read)."""
        with self._lock:
            return int(self.store.add(self._key("errors"), 0))

    def errors(self, skip: int | None = None) -> dict[int, BatchFailed]:
        """Published errors by publisher rank, without the one from ``skip``."""
        out: dict[int, BatchFailed] = {}
        with self._lock:
            for publisher in range(self.world_size):
                key = self._key("error", publisher)
                if publisher != skip and self.store.check([key]):
                    out[publisher] = pickle.loads(self.store.get(key))
        return out

    def ack(self, publisher: int) -> None:
        """Rank 0 has recorded ``publisher``'s error in the run store."""
        with self._lock:
            self.store.set(self._key("ack", publisher), b"1")

    def wait_ack(self, publisher: int, timeout: float) -> bool:
        """Wait (bounded) until rank 0 recorded our error, so it is stored before torchrun tears down."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with self._lock:
                    if self.store.check([self._key("ack", publisher)]):
                        return True
            except Exception:  # the store went away with its host
                return False
            time.sleep(ACK_POLL_SECONDS)
        return False


class PeerSink:
    """Events of a rank other than 0: buffered until the next checkpoint, counted for live progress.

    A segment's manifest does not wait for the checkpoint: it goes to rank 0 through the c10d store
    at once (`Channel.publish_segment`), so the step's commit does not wait for the next one.
    """

    def __init__(self, rank: int, channel: Channel) -> None:
        self.rank = rank
        self.channel = channel
        self.events: list[Event] = []
        self.fatal: BatchFailed | None = None
        self.abort: BatchFailed | None = None
        self._lock = threading.Lock()
        self._seq = 0
        self._segments = 0
        self._tally = Tally()

    def emit(self, event: Event) -> None:
        """Buffer ``event`` and count it; a fatal error of ours is published at once.

        Raises:
            RemoteFailure: another rank failed fatally (and we have not): leave the batch loop.
        """
        if self.abort is not None and self.fatal is None:
            raise RemoteFailure(self.abort)
        if isinstance(event, SegmentWritten):
            with self._lock:
                self.channel.publish_segment(self.rank, self._segments + 1, event)
                self._segments += 1  # only now may rank 0, reading our counters, look for it
                self._seq += 1
            return
        with self._lock:
            self._seq += 1
            self._tally.count(event)
            self.events.append(event)
        if isinstance(event, BatchFailed) and event.fatal and self.fatal is None:
            self.fatal = event
            self.channel.publish_progress(self.rank, self.counters())  # totals first: rank 0 reads them with the error
            self.channel.publish_error(self.rank, event)

    def counters(self) -> Counters:
        """A consistent snapshot of this rank's totals."""
        with self._lock:
            return Counters.of(self._seq, self._tally, time.time(), self._segments)

    def flush(self, coordinator: Coordinator) -> None:
        """Ship everything since the last checkpoint to rank 0 (a collective: every rank calls it)."""
        with self._lock:
            events, self.events = self.events, []
        coordinator.gather((events, self.counters()))


class PeerWatcher:
    """A daemon thread: publish counters, watch for other ranks' errors, leave if stuck after one."""

    def __init__(
        self, rank: int, channel: Channel, sink: PeerSink, finished: threading.Event, poll: float = POLL_SECONDS
    ) -> None:
        self.rank = rank
        self.channel = channel
        self.sink = sink
        self.finished = finished
        self.poll = poll
        self.thread = threading.Thread(target=self._run, daemon=True, name=f"nbbatch-watch-rank{rank}")

    def start(self) -> PeerWatcher:
        self.thread.start()
        return self

    def _run(self) -> None:
        """Every ``poll`` seconds until ``finished``: publish, then look for other ranks' errors."""
        while not self.finished.wait(self.poll):
            try:
                self.channel.publish_progress(self.rank, self.sink.counters())
                if self.sink.abort is None and self.channel.error_count():
                    errors = self.channel.errors(skip=self.rank)
                    if errors:
                        self.sink.abort = errors[min(errors)]
                        exit_later(self.finished, ABORT_GRACE_SECONDS)
            except Exception:  # the store's host is gone: the job is ending; collectives will tell
                return


def exit_later(finished: threading.Event, grace: float) -> None:
    """Leave the process with `EXIT_ABORTED` if the run has not finished ``grace`` seconds from now.

    The main thread may be stuck in a collective that waits for a rank that will never come; the
    failure is already recorded, so ending the process is the only way not to hang.
    """

    def _later() -> None:
        if finished.wait(grace):
            return
        sys.stderr.write(f"nbbatch: another rank failed and this rank did not stop within {grace:.0f}s; exiting\n")
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_ABORTED)

    threading.Thread(target=_later, daemon=True, name="nbbatch-exit-later").start()
