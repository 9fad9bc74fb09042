"""Sharding and fingerprints: pure functions of sizes, no I/O, no torch.

Global batch ``g`` holds dataset indices ``[g*bs, min((g+1)*bs, n))``. With ``W`` workers, worker
``r`` owns global batches ``g ≡ r (mod W)`` in order; its k-th one has ``batch_idx = k``, i.e.
``g = k*W + r``. Every worker runs the same number of iterations so that checkpoints line up.
Must not import torch, duckdb or any other nbbatch module.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from dataclasses import dataclass, fields

__all__ = ["Fingerprint", "Sharding", "make_sharding"]


@dataclass(frozen=True)
class Fingerprint:
    """What must not change between the attempts of one run."""

    dataset_len: int
    batch_size: int
    processor: str
    max_batches: int | None

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The fields, in the order `first_difference` compares them (also the store's column names)."""
        return tuple(f.name for f in fields(cls))

    def first_difference(self, other: Fingerprint) -> tuple[str, object, object] | None:
        """Return ``(field, self_value, other_value)`` for the first differing field, or None.

        Example:
            >>> Fingerprint(8, 2, "m.P", None).first_difference(Fingerprint(9, 2, "m.P", None))
            ('dataset_len', 8, 9)
        """
        for name in self.names():
            mine, theirs = getattr(self, name), getattr(other, name)
            if mine != theirs:
                return name, mine, theirs
        return None


@dataclass(frozen=True)
class Sharding:
    """One attempt's assignment of global batches to workers.

    Attributes:
        dataset_len: number of samples ``n``.
        batch_size: samples per global batch.
        world_size: number of workers ``W`` in this attempt.
        planned_batches: global batches the run covers (``g < planned_batches``), before drop_last.
        iterate_length: loop iterations every worker runs (Determined's ``iterate_length``).
        drop_last: whether a short final batch is dropped.
    """

    dataset_len: int
    batch_size: int
    world_size: int
    planned_batches: int
    iterate_length: int
    drop_last: bool = False

    @property
    def real_batches(self) -> int:
        """Global batches that hold data (excludes a dropped short tail)."""
        full = self.dataset_len // self.batch_size if self.drop_last else self.total_batches
        return min(self.planned_batches, full)

    @property
    def total_batches(self) -> int:
        """``ceil(n / bs)``: global batches of the whole dataset."""
        return math.ceil(self.dataset_len / self.batch_size)

    def global_batch(self, rank: int, batch_idx: int) -> int:
        """Global batch processed by ``rank`` at iteration ``batch_idx``."""
        return batch_idx * self.world_size + rank

    def indices(self, global_batch: int) -> range:
        """Dataset indices of a global batch."""
        start = global_batch * self.batch_size
        return range(start, min(start + self.batch_size, self.dataset_len))

    def todo(self, rank: int, done: Collection[int] = ()) -> list[int]:
        """Global batches ``rank`` still has to process, in order."""
        return [g for g in range(rank, self.real_batches, self.world_size) if g not in done]

    def start_batch_idx(self, done: Collection[int] = ()) -> int:
        """First iteration any worker has work in; Determined's ``skip`` after a clean resume."""
        for g in range(self.real_batches):
            if g not in done:
                return g // self.world_size
        return self.iterate_length


def make_sharding(
    dataset_len: int,
    batch_size: int,
    world_size: int,
    iterate_length: int | None = None,
    planned_batches: int | None = None,
    drop_last: bool = False,
) -> Sharding:
    """Build the sharding of a fresh run (``iterate_length``) or of a resume (``planned_batches``).

    A fresh run takes Determined's iteration count, ``ceil(ceil(n/bs)/W)`` or the valid
    ``max_batches``; a resumed run keeps the stored set of global batches, whatever its worker count.
    """
    total = math.ceil(dataset_len / batch_size)
    if planned_batches is None:
        length = math.ceil(total / world_size) if iterate_length is None else iterate_length
        planned_batches = min(total, length * world_size)
    else:
        length = math.ceil(planned_batches / world_size)
    return Sharding(dataset_len, batch_size, world_size, planned_batches, length, drop_last)
