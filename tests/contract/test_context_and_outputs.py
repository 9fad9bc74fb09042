"""TorchBatchProcessorContext in real workers, and how returned outputs land in DuckDB."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np
import pytest
import torch

import nbbatch
from nbbatch import TorchBatchProcessor, TorchBatchProcessorContext, torch_batch_process

pytestmark = pytest.mark.timeout(120)


class Inspect(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        self.context = context
        self.model = torch.nn.Linear(2, 2)
        self.prepared = context.prepare_model_for_inference(self.model)

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        ctx = self.context
        rank = ctx.get_distributed_rank()
        with ctx.upload_path() as path:
            (path / f"batch_{batch_idx}.txt").write_text(str(batch.tolist()))
        moved = ctx.to_device({"a": [batch, (np.arange(3), "text")]})
        ctx.report_metrics("inference", batch_idx, {"rows": len(batch), "note": "ok"})
        return {
            "same_model": [self.prepared is self.model and not self.model.training] * len(batch),
            "device": [str(ctx.device)] * len(batch),
            "numpy_became_tensor": [isinstance(moved["a"][1][0], torch.Tensor)] * len(batch),
            "tuple_kept": [isinstance(moved["a"][1], tuple) and moved["a"][1][1] == "text"] * len(batch),
            "world": [ctx.get_distributed_size()] * len(batch),
            "threads": [torch.get_num_threads()] * len(batch),
            "tensorboard": [str(ctx.get_tensorboard_path())] * len(batch),
            "vector": torch.stack([batch.float()] * 8, dim=1),
            "matrix": torch.zeros(len(batch), 3, 2),
            "ragged": [list(range(int(v) % 4)) for v in batch],
            "label": [f"item-{int(v)}" for v in batch],
            "scalar": batch * 1.5,
            "rank_seen": [rank] * len(batch),
        }


def test_context_and_output_types(tmp_path: pathlib.Path) -> None:
    run = torch_batch_process(Inspect, list(range(12)), batch_size=4, num_processes=2,
                              store=str(tmp_path / "s.duckdb"), progress=False)
    df = run.outputs().df()
    assert df.same_model.all() and (df.device == "cpu").all()
    assert df.numpy_became_tensor.all() and df.tuple_kept.all() and (df.world == 2).all()
    assert (df.threads == max(1, len(__import__("os").sched_getaffinity(0)) // 2)).all()
    assert (df.rank_seen == df["rank"]).all()
    types = dict(run.sql("SELECT column_name, column_type FROM (DESCRIBE outputs)").fetchall())
    assert types["vector"] == "FLOAT[8]" and types["matrix"] == "FLOAT[2][3]"
    assert types["ragged"] == "BIGINT[]" and types["label"] == "VARCHAR" and types["scalar"] == "FLOAT"
    assert run.sql("SELECT list_sum(vector) FROM outputs WHERE sample_index = 3").fetchall() == [(24.0,)]
    out = pathlib.Path(run.output_dir)
    for rank in (0, 1):
        assert sorted(p.name for p in (out / f"rank_{rank}").iterdir()) == ["batch_0.txt", "batch_1.txt"][: 2 - rank]
    assert (out / "rank_1" / "batch_0.txt").read_text() == "[4, 5, 6, 7]"
    assert df.tensorboard.iloc[0] == str(out / "tensorboard" / "rank_0")
    metrics = run.metrics().df()
    assert sorted(metrics[metrics.name == "rows"].value) == [4.0, 4.0, 4.0]
    assert set(metrics[metrics.name == "note"].value_json) == {'"ok"'}
    assert set(metrics.group) == {"inference"}


class WrongLength(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        pass

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        return {"short": batch[:1]}


def test_wrong_output_length_names_the_key(tmp_path: pathlib.Path) -> None:
    with pytest.raises(nbbatch.WorkerFailed, match=r"output 'short' has 1 entries but the batch holds 4 samples"):
        torch_batch_process(WrongLength, list(range(8)), batch_size=4, store=str(tmp_path / "s.duckdb"), progress=False)


def test_context_helpers_in_process() -> None:
    ctx = TorchBatchProcessorContext(rank=1, world_size=3)
    assert ctx.get_distributed_rank() == 1 and ctx.get_distributed_size() == 3 and ctx.get_hparams() == {}
    with pytest.raises(AssertionError, match="Detected invalid reducer in wrap_reducer"):
        ctx.wrap_reducer(42)  # type: ignore[arg-type]
    fn = ctx.wrap_reducer(lambda values: sum(values), name="s")
    with pytest.raises(AssertionError, match="Detected the same reducer of type"):
        ctx.wrap_reducer(fn)
    with pytest.raises(ValueError, match="without '.'"):
        ctx.report_metrics("a.b", 0, {"x": 1})
