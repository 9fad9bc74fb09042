"""The ``nbbatch`` command: ``run``, ``runs``, ``show``, ``resume``, ``export``, ``dashboard``.

It only parses into `torch_batch_process` arguments and maps outcomes to exit codes: 0 done,
1 failed, 2 bad usage, 130 interrupted (SIGINT), 143 terminated (SIGTERM, or a stop request).
torch loads only inside commands that run a processor, so ``nbbatch --help`` stays quick.
Must not import ``_launch``, ``_worker`` or ``_store.writer``.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

from nbbatch import __version__
from nbbatch._events import Status
from nbbatch._help import OPTION_HELP
from nbbatch._ui import serving, targets
from nbbatch._ui import trust as trust_ui
from nbbatch._ui.targets import UsageFailure

__all__ = ["main"]

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143
_STORE_HELP = OPTION_HELP["store"]


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("nbbatch")
    if not any(getattr(h, "_nbbatch_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._nbbatch_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _verbose_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("-v", "--verbose", is_flag=True, help="Show Python tracebacks and debug logs.")(f)


def _run_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `run` and `resume`."""
    for option in reversed([
        click.option("--store", "store", default=None, help=_STORE_HELP),
        click.option("--processes", type=click.IntRange(min=1), default=None,
                      help=OPTION_HELP["num_processes"]),
        click.option("--dashboard", "dashboard", is_flag=True, help="Serve the live dashboard while the run goes."),
        click.option("--dashboard-port", type=click.IntRange(0, 65535), default=5006, show_default=True,
                      help="Port of --dashboard."),
        click.option("--progress/--no-progress", default=True, show_default=True,
                      help="A progress bar on a terminal, plain lines otherwise."),
    ]):
        f = option(f)
    return _verbose_option(f)


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
@click.option("--batch-size", type=click.IntRange(min=1), default=1, show_default=True, help=OPTION_HELP["batch_size"])
@click.option("--checkpoint-interval", type=click.IntRange(min=1), default=5, show_default=True,
              help=OPTION_HELP["checkpoint_interval"])
@click.option("--max-batches", type=int, default=None, help=OPTION_HELP["max_batches"])
@click.option("--name", "run_name", default=None, callback=lambda ctx, param, value: _run_name(value),
              help=OPTION_HELP["run_name"])
@click.option("--on-error", type=click.Choice(["raise", "skip"]), default="raise", show_default=True,
              help=OPTION_HELP["on_error"])
@click.option("--max-failures", type=click.IntRange(min=0), default=None,
              help=OPTION_HELP["max_failures"])
@_run_options
def run_command(target: str, factory: str | None, table: str | None, dataset_args: tuple[str, ...], batch_size: int,
                checkpoint_interval: int,
                max_batches: int | None, run_name: str | None, on_error: str, max_failures: int | None,
                store: str | None, processes: int | None, dashboard: bool, dashboard_port: int, progress: bool,
                verbose: bool) -> int:
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
    _setup_logging(verbose)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # until the run installs its graceful handler
    launch = targets.launch_info(target, factory, table, dataset_args)
    kwargs = {"batch_size": batch_size, "max_batches": max_batches, "checkpoint_interval": checkpoint_interval,
              "run_name": run_name, "on_error": on_error, "max_failures": max_failures}
    return _start_run(launch, kwargs, targets.store_path(store), processes, dashboard, dashboard_port, progress, verbose)


@cli.command("resume")
@click.argument("run")
@click.option("--trust", is_flag=True, help="Run and sign records you did not sign (see `nbbatch trust`).")
@_run_options
def resume_command(run: str, trust: bool, store: str | None, processes: int | None, dashboard: bool,
                   dashboard_port: int, progress: bool, verbose: bool) -> int:
    """Resume the unfinished run RUN (name or id) that `nbbatch run` started.

    The processor and dataset are imported again as the run recorded them; committed batches are
    kept and every sample is stored exactly once. The number of processes may differ. Records
    you did not sign are refused: check them with `nbbatch show RUN`, then `nbbatch trust RUN`.
    """
    _setup_logging(verbose)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    path = targets.existing_store(store)
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
    launch = trust_ui.require(path, summary, trust)  # as checked, before anything it names is imported
    if launch.get("cwd") and os.path.isdir(launch["cwd"]):
        os.chdir(launch["cwd"])  # relative paths in the factory mean what they meant at `nbbatch run`
    kwargs = {"batch_size": summary["batch_size"], "max_batches": summary["max_batches"],
              "checkpoint_interval": summary["checkpoint_interval"], "run_name": _run_name(summary["name"], summary["run_id"]),
              "on_error": summary["on_error"] or "raise", "max_failures": summary["max_failures"]}
    if processes is None and "WORLD_SIZE" not in os.environ:
        processes = int(summary["world_size"] or 1)
    return _start_run(launch, kwargs, path, processes, dashboard, dashboard_port, progress, verbose, trust)


def _run_name(value: str | None, run_id: str | None = None) -> str | None:
    """``--name`` checked while parsing (exit 2, before any import); resuming a run an older nbbatch
    stored under a name outside today's rule uses its id instead."""
    from nbbatch._store.schema import check_run_name

    try:
        return None if value is None else check_run_name(value)
    except ValueError as exc:
        if run_id is not None:
            return run_id
        raise click.BadParameter(str(exc)) from None


cli.add_command(trust_ui.trust_command)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(EXIT_SIGTERM)


def _start_run(launch: dict[str, Any], kwargs: dict[str, Any], store: str, processes: int | None, dashboard: bool,
               dashboard_port: int, progress: bool, verbose: bool, trust: bool = False) -> int:
    """Import the processor and dataset, run, and turn the outcome into an exit code."""
    cwd = launch.get("cwd") or os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # like `python -m`: modules next to where the run was started
    processor = targets.processor(launch["target"], verbose)
    if launch.get("table"):
        dataset = targets.table(launch["table"])
    else:
        dataset = targets.dataset(launch["dataset"], launch.get("dataset_args") or {}, verbose)
    from nbbatch._api import torch_batch_process
    from nbbatch._errors import InvalidArgument, NbbatchError, ResumeMismatch, WorkerFailed

    server = serving.serve_during_run(store, dashboard_port) if dashboard else None
    try:
        run = torch_batch_process(processor, dataset, store=store, num_processes=processes, progress=progress,
                                  launch=launch, trust=trust, **kwargs)
    except KeyboardInterrupt as exc:
        click.echo(f"nbbatch: interrupted: {exc}" if str(exc) else "nbbatch: interrupted", err=True)
        return EXIT_SIGINT
    except SystemExit as exc:
        if exc.code == EXIT_SIGTERM:
            click.echo("nbbatch: terminated; the run committed its last checkpoint and can be resumed", err=True)
            return EXIT_SIGTERM
        raise
    except (InvalidArgument, ResumeMismatch, TypeError) as exc:
        _report(exc, verbose)
        return EXIT_USAGE
    except NbbatchError as exc:
        _report(exc, verbose)
        if isinstance(exc, WorkerFailed) and exc.run_name:
            click.echo(f"nbbatch: details: `nbbatch show {exc.run_name}`; resume: `nbbatch resume {exc.run_name}`",
                       err=True)
        return EXIT_FAILED
    except Exception as exc:  # not ours: still one message, the traceback with --verbose
        _report(exc, verbose, with_type=True)
        return EXIT_FAILED
    finally:
        serving.stop_server(server)
    if os.environ.get("RANK", "0") != "0":
        return EXIT_DONE  # under torchrun only rank 0 reports; the store lives on its machine
    summary = run.summary
    click.echo(_one_line(summary))
    if summary["status"] == Status.PREEMPTED:
        click.echo(f"nbbatch: run {summary['name']!r} was stopped; continue it with `nbbatch resume {summary['name']}`",
                   err=True)
        return EXIT_SIGTERM
    return EXIT_DONE if summary["status"] == Status.DONE else EXIT_FAILED


def _report(exc: BaseException, verbose: bool, with_type: bool = False) -> None:
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
        return
    message = getattr(exc, "message", None) or str(exc)  # WorkerFailed.message leaves out the remote traceback
    click.echo(f"Error: {type(exc).__name__ + ': ' if with_type else ''}{message} (--verbose shows the traceback)",
               err=True)


def _one_line(s: dict[str, Any]) -> str:
    return (f"run {s['name']!r} {s['status']}: {s['committed_batches']}/{s['real_batches']} batches, "
            f"{s['committed_rows']} rows, {s['errors']} errors")


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
                      str(r["created_at"])[:19]))
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
        by_type = con.execute(
            "SELECT exc_type, count(*) FROM errors WHERE run_id = ? GROUP BY exc_type ORDER BY 2 DESC", [s["run_id"]]
        ).fetchall()
        last = con.execute(
            "SELECT rank, batch_idx, exc_type, message FROM errors WHERE run_id = ? ORDER BY occurred_at DESC LIMIT 1",
            [s["run_id"]],
        ).fetchall()
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
        rank, batch_idx, exc_type, message = last[0]
        lines.append(("last error", f"rank {rank}, batch_idx {batch_idx}: {exc_type}: {_first_line(message)}"))
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
