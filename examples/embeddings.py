"""Compute image embeddings, store them as DuckDB arrays, then search them with SQL.

Each worker returns one 512-d vector per image; nbbatch stores them in a ``FLOAT[512]`` column
next to the image's ``sample_index``, so a nearest-neighbour query is one SQL statement.

    python examples/embeddings.py --size 1024 --processes 2
"""

from __future__ import annotations

import argparse

import torch
import torchvision
from torchvision import transforms

from nbbatch import TorchBatchProcessor, torch_batch_process


class EmbeddingProcessor(TorchBatchProcessor):
    def __init__(self, context):
        self.context = context
        model = torchvision.models.resnet18(weights=None)
        model.fc = torch.nn.Identity()  # the 512-d penultimate layer is the embedding
        self.model = context.prepare_model_for_inference(model)

    def process_batch(self, batch, batch_idx):
        images, labels = self.context.to_device(batch)
        with torch.no_grad():
            vectors = torch.nn.functional.normalize(self.model(images), dim=1)
        return {"embedding": vectors, "label": labels}


def make_dataset(size: int = 1024) -> torchvision.datasets.FakeData:
    return torchvision.datasets.FakeData(size=size, image_size=(3, 32, 32), num_classes=10, transform=transforms.ToTensor())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--store", default="nbbatch.duckdb")
    args = parser.parse_args()

    run = torch_batch_process(
        EmbeddingProcessor, make_dataset(args.size), batch_size=64, num_processes=args.processes, store=args.store
    )
    print(run.sql("SELECT typeof(embedding) AS stored_as, count(*) AS rows FROM outputs GROUP BY ALL").df().to_string(index=False))
    # Nearest neighbours of image 0, by cosine similarity, in SQL.
    neighbours = run.sql(
        """
        SELECT o.sample_index, o.label,
               array_cosine_similarity(o.embedding, q.embedding) AS similarity
        FROM outputs o, (SELECT embedding FROM outputs WHERE sample_index = $query) q
        ORDER BY similarity DESC
        LIMIT 5
        """,
        params={"query": 0},
    ).df()
    print(neighbours.to_string(index=False))


if __name__ == "__main__":
    main()
