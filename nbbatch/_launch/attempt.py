"""The sharding and worker spec of one attempt, shared by the local and torchrun launchers."""

from __future__ import annotations

from typing import Any

from nbbatch._plan import Sharding, make_sharding
from nbbatch._worker.loop import WorkerSpec

__all__ = ["attempt_spec"]


def attempt_spec(config: Any, dataset_len: int, world_size: int, user: bytes, run: Any) -> tuple[Sharding, WorkerSpec]:
    """The sharding and worker spec of one attempt of ``run`` (a `RunRecord` or what rank 0 broadcast).

    The plan comes from the store (``run.planned_batches``), so a resume covers the same global
    batches whatever its worker count.
    """
    sharding = make_sharding(dataset_len, config.batch_size, world_size, planned_batches=run.planned_batches,
                             drop_last=config.drop_last)
    spec = WorkerSpec(
        user=user, sharding=sharding, done=run.done, checkpoint_interval=config.checkpoint_interval,
        on_error=config.on_error, max_failures=config.max_failures, output_dir=run.output_dir,
        prior_reducer_states=run.reducer_states, run_id=run.run_id,
        output_columns=run.output_columns, attempt=run.attempt,
    )
    return sharding, spec
