"""Processors over `TableDataset` batches, for the table tests (loaded as `path/to/table_procs.py:attr`)."""

from __future__ import annotations

import os

from nbbatch import TorchBatchProcessor


class Score(TorchBatchProcessor):
    """``score = 2 * x`` and an upper-cased ``name`` (an output named like an input column).

    Raises on the batch holding id $NBBATCH_TEST_FAIL_ID while the file $NBBATCH_TEST_FAIL_FILE exists.
    """

    def __init__(self, context):
        self.fail_id = int(os.environ.get("NBBATCH_TEST_FAIL_ID", "-1"))
        self.fail_file = os.environ.get("NBBATCH_TEST_FAIL_FILE", "")

    def process_batch(self, batch, batch_idx):
        ids = batch["id"].tolist()
        if self.fail_id in ids and self.fail_file and os.path.exists(self.fail_file):
            raise ValueError(f"cannot score id {self.fail_id}")
        return {"score": batch["x"] * 2, "name": [n.upper() for n in batch["name"]], "pid": [os.getpid()] * len(ids)}
