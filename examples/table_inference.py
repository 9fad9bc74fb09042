"""Tables in, tables out: classify a folder of images listed by SQL, get the file names back with predictions.

The input is a query: DuckDB's ``glob()`` lists the image files, ``ORDER BY`` fixes their order.
Each batch is a dict of columns (``batch["path"]`` is a list of file names); the processor loads
the images and returns a label and a confidence per image. `Run.outputs(inputs=True)` gives the
query's rows with the predictions next to them, and one line of SQL summarizes them per class.

    python examples/table_inference.py                          # 96 generated images, 2 workers
    python examples/table_inference.py --images 512 --processes 1 --store /tmp/tables.duckdb
    nbbatch run examples/table_inference.py:Classify --table "SELECT file AS path FROM glob('images/*.png') ORDER BY file"
"""

from __future__ import annotations

import argparse
import os

import numpy as np
import torch
import torchvision
from PIL import Image

from nbbatch import TableDataset, TorchBatchProcessor, TorchBatchProcessorContext, torch_batch_process

CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def make_images(folder: str, count: int, seed: int = 0) -> str:
    """Write ``count`` small random PNGs into ``folder`` (nothing is downloaded); returns the folder."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(count):
        pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(folder, f"img_{i:05d}.png"))
    return folder


def images_query(folder: str) -> str:
    """The input table: one row per PNG file, in file-name order."""
    pattern = os.path.join(folder, "*.png").replace("'", "''")
    return f"SELECT file AS path, parse_filename(file) AS file_name FROM glob('{pattern}') ORDER BY file"


class Classify(TorchBatchProcessor):
    """A CIFAR-shaped ResNet-18 (random weights: no download) over the images named in ``batch["path"]``."""

    def __init__(self, context: TorchBatchProcessorContext) -> None:
        self.context = context
        self.model = context.prepare_model_for_inference(torchvision.models.resnet18(weights=None, num_classes=10))
        self.mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)

    def process_batch(self, batch, batch_idx):
        pixels = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in batch["path"]])
        images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(255).sub(self.mean).div(0.5)
        with torch.no_grad():
            probabilities = self.model(self.context.to_device(images)).softmax(dim=1)
        confidence, label = probabilities.max(dim=1)
        return {"label": [CLASSES[i] for i in label.tolist()], "confidence": confidence}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=96, help="number of images to generate")
    parser.add_argument("--folder", default="images")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--store", default="nbbatch.duckdb")
    parser.add_argument("--name", default=None, help="run name; an unfinished run of that name resumes")
    args = parser.parse_args()

    folder = make_images(args.folder, args.images)
    run = torch_batch_process(
        Classify, TableDataset(images_query(folder)), batch_size=args.batch_size, num_processes=args.processes,
        store=args.store, run_name=args.name,
    )
    print(f"run {run.name!r}: {run.status}, {run.counts['rows']} images")
    print(run.outputs(inputs=True).project("sample_index, file_name, label, confidence").limit(5).df().to_string(index=False))
    # One line of SQL per class: how many images, and how sure the model was.
    summary = "SELECT label, count(*) AS images, round(avg(confidence), 3) AS confidence FROM outputs GROUP BY label ORDER BY label"
    print(run.sql(summary).df().to_string(index=False))
    print(f"export: nbbatch export {run.name} --with-inputs --to predictions.parquet --store {run.store}")


if __name__ == "__main__":
    main()
