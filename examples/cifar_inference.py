"""Batch inference on CIFAR-10-shaped images, the flow of Determined's docs, run locally.

The processor is the one from Determined's user guide (predictions buffered and saved with
``upload_path`` at each checkpoint), plus two nbbatch additions: ``process_batch`` returns the
predictions, which land in DuckDB one row per image, and an accuracy reducer.

    python examples/cifar_inference.py                 # 2 workers, store nbbatch.duckdb
    python examples/cifar_inference.py --size 512 --processes 1 --store /tmp/demo.duckdb
"""

from __future__ import annotations

import argparse
import pathlib

import torch
import torchvision
from torchvision import transforms

from nbbatch import MetricReducer, TorchBatchProcessor, TorchBatchProcessorContext, torch_batch_process


class AccuracyMetricReducer(MetricReducer):
    """Share of correct predictions over every worker."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.total = 0

    def update(self, correct: int, total: int) -> None:
        self.correct += correct
        self.total += total

    def per_slot_reduce(self) -> tuple[int, int]:
        return self.correct, self.total

    def cross_slot_reduce(self, per_slot_metrics: list[tuple[int, int]]) -> float:
        correct = sum(c for c, _ in per_slot_metrics)
        total = sum(t for _, t in per_slot_metrics)
        return correct / max(total, 1)


class InferenceProcessor(TorchBatchProcessor):
    def __init__(self, context: TorchBatchProcessorContext) -> None:
        self.context = context
        model = torchvision.models.resnet18(weights=None, num_classes=10)
        self.model = context.prepare_model_for_inference(model)
        self.accuracy = context.wrap_reducer(AccuracyMetricReducer(), name="accuracy")
        self.output: list[dict[str, torch.Tensor]] = []
        self.last_index = 0

    def process_batch(self, batch, batch_idx):
        images, labels = self.context.to_device(batch)
        with torch.no_grad():
            logits = self.model(images)
        predictions = logits.argmax(dim=1)
        self.accuracy.update(int((predictions == labels).sum()), len(labels))
        self.output.append({"predictions": predictions.cpu(), "labels": labels.cpu()})
        self.last_index = batch_idx
        # nbbatch stores this return value in DuckDB: one row per image.
        return {"prediction": predictions, "label": labels, "logits": logits}

    def on_checkpoint_start(self):
        """As in Determined's guide: persist buffered predictions at each checkpoint."""
        if not self.output:
            return
        with self.context.upload_path() as path:
            torch.save(self.output, pathlib.Path(path, f"prediction_output_{self.last_index}"))
        self.output = []


def make_dataset(size: int = 2048) -> torchvision.datasets.FakeData:
    """CIFAR-10-shaped random images (nothing is downloaded)."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])
    return torchvision.datasets.FakeData(size=size, image_size=(3, 32, 32), num_classes=10, transform=transform)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2048, help="number of images")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--store", default="nbbatch.duckdb")
    parser.add_argument("--name", default=None, help="run name; an unfinished run of that name resumes")
    args = parser.parse_args()

    run = torch_batch_process(
        InferenceProcessor,
        make_dataset(args.size),
        batch_size=args.batch_size,
        checkpoint_interval=5,
        num_processes=args.processes,
        store=args.store,
        run_name=args.name,
    )
    counts = run.counts
    print(f"run {run.name!r}: {run.status}, {counts['rows']} predictions in {counts['committed_batches']} batches")
    print(f"reduced metrics: {run.reduced_metrics}")
    print(run.sql("SELECT prediction, count(*) AS images FROM outputs GROUP BY ALL ORDER BY 1").df().to_string(index=False))
    print(f"upload_path files: {run.output_dir}")
    print(f"look at it: nbbatch dashboard --store {run.store}    (or: nbbatch show {run.name} --store {run.store})")


if __name__ == "__main__":
    main()
