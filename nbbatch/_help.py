"""Help texts of the run options, written once for the CLI, the magic and the API docs.

Keys are `torch_batch_process` argument names. Imports nothing, so ``nbbatch --help`` stays fast.
"""

from __future__ import annotations

__all__ = ["OPTION_HELP"]

OPTION_HELP: dict[str, str] = {
    "batch_size": "Samples per batch.",
    "max_batches": "Cap on batches per worker; invalid values warn and are ignored.",
    "checkpoint_interval": "Commit every this many batches per worker.",
    "num_processes": "Local worker processes (default: one per GPU, else 1; leave unset under torchrun).",
    "store": "DuckDB store file (default: $NBBATCH_STORE or ./nbbatch.duckdb).",
    "run_name": "Run name (letters, digits and ._-, not starting with - or .); naming an unfinished run resumes "
                "it, a finished one is returned as is.",
    "on_error": "`raise`: stop at the first failing batch; `skip`: record it and go on.",
    "max_failures": "With on_error=skip: fail the run once more batches than this failed.",
    "table": "Instead of a dataset: DuckDB SQL (\"SELECT ... ORDER BY id\", quoted) or a .parquet/.csv/.json path, "
             "read as a TableDataset; batches are dicts of column -> tensor or list, and the run keeps the rows "
             "(outputs(inputs=True), export --with-inputs).",
}
