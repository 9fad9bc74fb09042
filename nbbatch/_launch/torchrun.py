"""Joining a torchrun (torch.distributed) world: each process is one worker; rank 0 writes the store."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

__all__ = ["TorchrunEnv", "environment", "run"]


@dataclass(frozen=True)
class TorchrunEnv:
    """The torch.distributed coordinates torchrun puts in the environment."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int


def environment() -> TorchrunEnv | None:
    """The torchrun coordinates, or None when not started by torchrun."""
    env = os.environ
    if "TORCHELASTIC_RUN_ID" not in env and not ("MASTER_ADDR" in env and "RANK" in env and "WORLD_SIZE" in env):
        return None
    if env.get("NBBATCH_LOCAL_WORKER") == "1":
        return None
    world = int(env.get("WORLD_SIZE", "1"))
    return TorchrunEnv(
        rank=int(env.get("RANK", "0")),
        world_size=world,
        local_rank=int(env.get("LOCAL_RANK", "0")),
        local_world_size=int(env.get("LOCAL_WORLD_SIZE", str(world))),
    )


def run(config: Any, spec: Any, user: bytes, sharding: Any, reporter: Any, env: TorchrunEnv) -> Any:
    """Run this process's share under torchrun (see issue: scale-out)."""
    raise NotImplementedError("torchrun support is being built")
