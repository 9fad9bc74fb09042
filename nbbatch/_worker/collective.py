"""How workers agree at checkpoints: a no-op for one worker, torch.distributed (gloo) otherwise.

Our own collectives always run on a gloo group over CPU tensors, so they work beside an NCCL
default group that user code may use for tensors.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.distributed as dist

__all__ = ["Coordinator", "SoloCoordinator", "TorchCoordinator"]


class Coordinator(Protocol):
    """The collectives the batch loop needs; every rank calls them in the same order."""

    rank: int
    world_size: int

    def sync(self, stop: bool, failures: int) -> tuple[bool, int]:
        """Barrier: any rank's stop request stops all; failures are summed."""
        ...

    def gather(self, obj: Any) -> list[Any] | None:
        """Gather one picklable object per rank on rank 0 (others get None)."""
        ...


class SoloCoordinator:
    """A world of one: nothing to agree on."""

    rank = 0
    world_size = 1

    def sync(self, stop: bool, failures: int) -> tuple[bool, int]:
        return stop, failures

    def gather(self, obj: Any) -> list[Any] | None:
        return [obj]


class TorchCoordinator:
    """Collectives over a torch.distributed gloo group."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def sync(self, stop: bool, failures: int) -> tuple[bool, int]:
        flags = torch.tensor([int(stop), failures], dtype=torch.int64)
        dist.all_reduce(flags, group=self.group)
        return bool(flags[0].item()), int(flags[1].item())

    def gather(self, obj: Any) -> list[Any] | None:
        out: list[Any] | None = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out
