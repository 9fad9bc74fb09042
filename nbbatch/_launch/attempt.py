"""The sharding and worker spec of one attempt, shared by the local and torchrun transports."""

from __future__ import annotations

from typing import TYPE_CHECKING

from nbbatch._plan import Sharding, make_sharding
from nbbatch._store.records import RunRecord
from nbbatch._worker.loop import WorkerSpec

if TYPE_CHECKING:
    from nbbatch._options import RunConfig

__all__ = ["attempt_spec"]


def attempt_spec(config: RunConfig, dataset_len: int, world_size: int, user: bytes,
                 run: RunRecord) -> tuple[Sharding, WorkerSpec]:
    """The sharding and worker spec of one attempt of ``run``.

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
