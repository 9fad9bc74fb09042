"""One script, three launchers: plain Python, torchrun on one node, torchrun across nodes.

Under torchrun each process is one worker (``cuda:LOCAL_RANK`` when GPUs exist); rank 0 writes the
store, the other ranks send it their outputs at each checkpoint. Nothing in the script changes.

    python examples/torchrun_inference.py                                   # local workers
    torchrun --standalone --nproc-per-node 2 examples/torchrun_inference.py
    # two machines (run on each, NODE = 0 or 1, HOST = node 0's address):
    torchrun --nnodes 2 --node-rank $NODE --master-addr $HOST --master-port 29500 \\
        --nproc-per-node 4 examples/torchrun_inference.py --store /data/runs.duckdb
"""

from __future__ import annotations

import argparse
import os

import torch
import torchvision
from torchvision import transforms

from nbbatch import TorchBatchProcessor, TorchBatchProcessorContext, torch_batch_process


class Classify(TorchBatchProcessor):
    """A randomly initialised ResNet-18 (no download); any model works the same way."""

    def __init__(self, context: TorchBatchProcessorContext) -> None:
        self.context = context
        self.model = context.prepare_model_for_inference(torchvision.models.resnet18(weights=None, num_classes=10))
        self.correct = context.wrap_reducer(lambda values: sum(c for c, _ in values) / max(1, sum(n for _, n in values)),
                                            name="accuracy")

    def process_batch(self, batch, batch_idx):
        images, labels = self.context.to_device(batch)
        with torch.no_grad():
            logits = self.model(images)
        predictions = logits.argmax(dim=1)
        self.correct.update((int((predictions == labels).sum()), len(labels)))
        return {"prediction": predictions, "label": labels, "confidence": logits.softmax(dim=1).amax(dim=1)}


def make_dataset(size: int = 1024) -> torchvision.datasets.FakeData:
    """CIFAR-10-shaped random images."""
    return torchvision.datasets.FakeData(size=size, image_size=(3, 32, 32), num_classes=10,
                                         transform=transforms.ToTensor())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--store", default="nbbatch.duckdb", help="lives on rank 0's machine")
    parser.add_argument("--name", default=None, help="an unfinished run of that name resumes")
    args = parser.parse_args()

    run = torch_batch_process(Classify, make_dataset(args.size), batch_size=args.batch_size, checkpoint_interval=5,
                              store=args.store, run_name=args.name)
    if os.environ.get("RANK", "0") == "0":  # the store is on rank 0's machine
        print(run)
        print(run.sql("SELECT rank, count(*) AS images, avg(confidence) AS confidence FROM outputs GROUP BY rank "
                      "ORDER BY rank").df().to_string(index=False))


if __name__ == "__main__":
    main()
