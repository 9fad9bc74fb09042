"""The ``nbbatch`` command: ``run``, ``runs``, ``show``, ``resume``, ``export``, ``dashboard``.

It only parses into `torch_batch_process` arguments (``run`` and ``resume`` take the run options
of ``_options`` through ``runner``) and maps outcomes to exit codes: 0 done, 1 failed, 2 bad
usage, 130 interrupted (SIGINT), 143 terminated (SIGTERM, or a stop request). torch loads only
inside commands that run a processor, so ``nbbatch --help`` stays quick. Must not import
``_launch``, ``_worker`` or ``_store.writer``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import click

from nbbatch import __version__
from nbbatch._events import Status
from nbbatch._options import OPTION_HELP, option, stored_values
from nbbatch._ui import runner, serving, targets
from nbbatch._ui import trust as trust_ui
from nbbatch._ui.runner import EXIT_DONE, EXIT_SIGINT, Display
from nbbatch._ui.targets import UsageFailure

__all__ = ["main"]

_STORE_HELP = OPTION_HELP["store"]
_TO_THE_SECOND = len("2024-01-31 12:00:00")  # `runs` shows creation times without fractions of a second


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="nbbatch")
def cli() -> None:
    """Batch inference with PyTorch from the terminal; outputs, metrics and progress go to one DuckDB file.

    \b
    Examples:
      nbbatch run models.py:Classify --dataset data.py:make_dataset --dataset-arg size=1000 --processes 2
      nbbatch runs
      nbbatch show RUN
      nbbatch export RUN --to predictions.parquet
    """


@cli.command("run")
@click.argument("target")
@click.option("--dataset", "factory", default=None, metavar="FACTORY",
              help="`module:attr` or `path.py:attr`: a Dataset, or a callable returning one (called with --dataset-arg).")
@click.option("--table", "table", default=None, metavar="SOURCE", help=OPTION_HELP["table"])
@click.option("--dataset-arg", "dataset_args", multiple=True, metavar="KEY=VALUE",
              help="Keyword argument for FACTORY; VALUE is parsed as JSON when it can be (size=100, train=false).")
@runner.run_options("run")
def run_command(target: str, factory: str | None, table: str | None, dataset_args: tuple[str, ...],
                **options: Any) -> int:
    """Run the processor class TARGET over the dataset FACTORY, or over the rows of a table (--table).

    TARGET and FACTORY are `module:attr` (imported from the current directory or sys.path) or
    `path/to/file.py:attr`. The run records how to re-create them, so `nbbatch resume RUN` and the
    dashboard's Resume button can continue it.

    \b
    Example:
      nbbatch run examples/embeddings.py:EmbeddingProcessor \\
          --dataset examples/embeddings.py:make_dataset --dataset-arg size=512 --batch-size 64
      nbbatch run model.py:Classify --table "SELECT id, path FROM 'in.parquet' ORDER BY id" --batch-size 32
    """
    display = Display.take(options)
    launch = targets.launch_info(target, factory, table, dataset_args)
    return runner.start(launch, {**options, "store": targets.store_path(options["store"])}, display)


@cli.command("resume")
@click.argument("run")
@runner.run_options("resume")
def resume_command(run: str, **options: Any) -> int:
    """Resume the unfinished run RUN (name or id) that `nbbatch run` started.

    The processor and dataset are imported again as the run recorded them; committed batches are
    kept and every sample is stored exactly once. The number of processes may differ. Records
    you did not sign are refused: check them with `nbbatch show RUN`, then `nbbatch trust RUN`.
    """
    display = Display.take(options)
    path = targets.existing_store(options["store"])
    summary = targets.run_summary(path, run)
    launch = summary.get("launch") or {}
    if not launch.get("target") or not (launch.get("dataset") or launch.get("table")):
        raise UsageFailure(
            f"run {summary['name']!r} was not started by `nbbatch run` (it has no launch info; probably a "
            f"notebook or script started it); resume it there with `torch_batch_process(..., "
            f"run_name={summary['name']!r})`"
        )
    if summary["status"] == Status.DONE:
        click.echo(f"run {summary['name']!r} is already done; `nbbatch show {summary['name']}` describes it")
        return EXIT_DONE
    launch = trust_ui.require(path, summary, options["trust"])  # as checked, before anything it names is imported
    if launch.get("cwd") and os.path.isdir(launch["cwd"]):
        os.chdir(launch["cwd"])  # relative paths in the factory mean what they meant at `nbbatch run`
    return runner.start(launch, {**options, **_resumed(summary, options["num_processes"]), "store": path}, display)


def _resumed(summary: dict[str, Any], processes: int | None) -> dict[str, Any]:
    """The options the run keeps, as `nbbatch run` gave them; the worker count may change."""
    if processes is None and "WORLD_SIZE" not in os.environ:
        processes = int(summary["world_size"] or 1)
    try:
        name = option("run_name").require(summary["name"])
    except ValueError:  # an older nbbatch stored a name outside today's rule: the id names the run too
        name = summary["run_id"]
    return {**stored_values(summary), "run_name": name, "num_processes": processes}


cli.add_command(trust_ui.trust_command)


@cli.command("runs")
@click.option("--store", "store", default=None, help=_STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per run instead of a table.")
def runs_command(store: str | None, as_json: bool) -> int:
    """List the runs in a store, newest first."""
    from nbbatch._errors import StoreError
    from nbbatch._store import reader

    path = targets.existing_store(store)
    try:
        with reader.reading(path) as con:
            rows = reader.list_runs(con)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        for row in rows:
            click.echo(json.dumps(row, default=str))
        return EXIT_DONE
    table = [("NAME", "STATUS", "BATCHES", "ROWS", "ERRORS", "WORKERS", "CREATED")]
    for r in rows:
        table.append((str(r["name"]), str(r["status"]), f"{r['committed_batches']}/{r['real_batches']}",
                      str(r["committed_rows"]), str(r["errors"]), str(r["world_size"]),
                      str(r["created_at"])[:_TO_THE_SECOND]))
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
    if not rows:
        click.echo(f"(no runs in {path})")
    return EXIT_DONE


@cli.command("show")
@click.argument("run")
@click.option("--store", "store", default=None, help=_STORE_HELP)
@click.option("--json", "as_json", is_flag=True, help="The run's summary as JSON.")
def show_command(run: str, store: str | None, as_json: bool) -> int:
    """Describe the run RUN (name or id): status, counts, reduced metrics, errors, output folder."""
    from nbbatch._store import reader

    path = targets.existing_store(store)
    s = targets.run_summary(path, run)
    with reader.reading(path) as con:
        by_type = reader.error_counts(con, s["run_id"])
        last = reader.latest_errors(con, s["run_id"], 1)
    if as_json:
        click.echo(json.dumps({**s, "errors_by_type": dict(by_type), "trust": trust_ui.show_json(path, s)},
                              default=str, indent=2))
        return EXIT_DONE
    launch = s.get("launch") or {}
    lines = [
        ("run", f"{s['name']} ({s['run_id']})"),
        ("status", str(s["status"])),
        ("processor", str(s["processor"])),
        ("batches", f"{s['committed_batches']}/{s['real_batches']} committed (batch size {s['batch_size']})"),
        ("rows", str(s["committed_rows"])),
        ("workers", f"{s['world_size']} (attempt {s['attempt']})"),
        ("errors", ", ".join(f"{t} x{n}" for t, n in by_type) if by_type else "none"),
    ]
    if last:
        e = last[0]
        lines.append(("last error", f"rank {e.rank}, batch_idx {e.batch_idx}: {e.exc_type}: {_first_line(e.message)}"))
    if s.get("error"):
        lines.append(("failure", _first_line(str(s["error"]))))
    lines += [
        ("reduced metrics", json.dumps(s.get("reduced_metrics") or {}, default=str)),
        ("output dir", str(s["output_dir"])),
        ("store", path),
    ] + trust_ui.show_lines(path, s)  # what a resume would import and call, and who signed it
    if Status(s["status"]).resumable:  # not `running`: a live run's lock refuses a second launcher
        lines.append(("resume", f"nbbatch resume {s['name']}" if launch.get("target")
                      else f"from Python: torch_batch_process(..., run_name={s['name']!r})"))
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        click.echo(f"{key + ':' if key else '':<{width + 2}}{value}")
    return EXIT_DONE


def _first_line(text: str, limit: int = 300) -> str:
    line = (text.strip().splitlines() or [""])[0]
    return line if len(line) <= limit else line[: limit - 3] + "..."


@cli.command("export")
@click.argument("run")
@click.option("--to", "target", required=True, metavar="FILE",
              help="Output file; .parquet, .csv or .json (newline-delimited) picks the format.")
@click.option("--store", "store", default=None, help=_STORE_HELP)
@click.option("--with-inputs", is_flag=True,
              help="Put each output row next to its input row (runs over --table / TableDataset): sample_index, "
                   "the input columns (input_<name> where an output has the name), then the outputs.")
def export_command(run: str, target: str, store: str | None, with_inputs: bool) -> int:
    """Write the outputs of RUN (one row per sample, in dataset order) to a Parquet, CSV or JSON file."""
    from nbbatch._store import reader
    from nbbatch._store.sql import literal

    formats = {".parquet": "parquet", ".pq": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}
    fmt = formats.get(os.path.splitext(target)[1].lower())
    if fmt is None:
        raise UsageFailure(f"cannot tell the format of `{target}`; end it in .parquet, .csv or .json")
    path = targets.existing_store(store)
    run_id = str(targets.run_summary(path, run)["run_id"])
    out = os.path.abspath(target)
    options = "FORMAT parquet" if fmt == "parquet" else ("FORMAT csv, HEADER" if fmt == "csv" else "FORMAT json")
    with reader.reading(path) as con:
        relation = reader.outputs_relation(con, run_id)
        query = relation.sql_query()
        if with_inputs:
            query = targets.with_inputs(con, run, run_id, query, list(relation.columns))
        con.execute(f"COPY ({query}) TO {literal(out)} ({options})")
        rows = con.execute(f"SELECT count(*) FROM ({query})").fetchall()[0][0]
    click.echo(f"wrote {rows} rows to {out}")
    return EXIT_DONE


@cli.command("compact")
@click.argument("run")
@click.option("--store", "store", default=None, help=_STORE_HELP)
@click.option("--into-table", is_flag=True, help="Move the outputs into the store's own table (one file to copy).")
def compact_command(run: str, store: str | None, into_table: bool) -> int:
    """Merge the output segments of RUN (one per worker per checkpoint) into one file, or into the store."""
    from nbbatch._store import segments
    from nbbatch._store.connection import StoreOpenError, open_store

    path = targets.existing_store(store)
    summary = targets.run_summary(path, run)
    if summary["status"] == Status.RUNNING:
        raise UsageFailure(f"run {run!r} is still running; compact it once it has ended")
    try:
        with open_store(path, write=True) as con:
            merged, rows = segments.compact(con, str(summary["run_id"]), path, into_table=into_table)
    except StoreOpenError as exc:
        raise click.ClickException(str(exc)) from None
    where = "the store's outputs table" if into_table else "one segment"
    click.echo(f"merged {merged} segments ({rows} rows) of run {summary['name']!r} into {where}")
    return EXIT_DONE


cli.add_command(serving.dashboard_command)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``nbbatch`` script and ``python -m nbbatch``; exits with the command's code."""
    try:
        code = cli.main(args=argv, prog_name="nbbatch", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        click.echo("nbbatch: interrupted", err=True)
        code = EXIT_SIGINT
    sys.exit(code if isinstance(code, int) else EXIT_DONE)
