"""What ``nbbatch run`` and ``nbbatch resume`` share: their options, the run, and its exit code.

The run options come from the table in ``_options`` (flag, type, default, help text, rule); the
display options (``--dashboard``, ``--progress``, ``--verbose``) are the CLI's own. Outcomes map
to exit codes: 0 done, 1 failed, 2 bad usage, 130 interrupted (SIGINT), 143 terminated (SIGTERM,
or a stop request). Must not import ``_launch``, ``_worker`` or ``_store.writer``; torch loads
only inside `start`, so ``nbbatch --help`` stays quick.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any, TypeVar

import click

from nbbatch._errors import InvalidArgument, NbbatchError, ResumeMismatch, WorkerFailed
from nbbatch._events import Status
from nbbatch._options import Option, Place, flagged
from nbbatch._ui import serving, targets

__all__ = [
    "EXIT_DONE", "EXIT_FAILED", "EXIT_SIGINT", "EXIT_SIGTERM", "EXIT_USAGE", "Display", "run_options", "start",
]

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_SIGINT, EXIT_SIGTERM = 0, 1, 2, 130, 143

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Display:
    """How a run started from the terminal shows itself (the CLI's own options, not the run's)."""

    dashboard: bool
    dashboard_port: int
    progress: bool
    verbose: bool

    @classmethod
    def take(cls, options: dict[str, Any]) -> Display:
        """Take the display options out of a command's ``options`` (the run's options stay), set up
        logging, and exit with 143 on SIGTERM until the run installs its graceful handler."""
        display = cls(**{f.name: options.pop(f.name) for f in fields(cls)})
        _setup_logging(display.verbose)
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
        return display


_DISPLAY_OPTIONS = (
    click.option("--dashboard", "dashboard", is_flag=True, help="Serve the live dashboard while the run goes."),
    click.option("--dashboard-port", type=click.IntRange(0, 65535), default=serving.DEFAULT_PORT, show_default=True,
                 help="Port of --dashboard."),
    click.option("--progress/--no-progress", default=True, show_default=True,
                 help="A progress bar on a terminal, plain lines otherwise."),
    click.option("-v", "--verbose", is_flag=True, help="Show Python tracebacks and debug logs."),
)


def run_options(place: Place) -> Callable[[F], F]:
    """The table's options of ``nbbatch PLACE`` as click options (keyword = option name), then the display's."""
    def decorate(f: F) -> F:
        for option in reversed([*map(_click_option, flagged(place)), *_DISPLAY_OPTIONS]):
            f = option(f)
        return f

    return decorate


def _click_option(option: Option) -> Callable[[F], F]:
    """Numbers and choices are checked by click's types; other values by the option's rule, while
    parsing (``--name ../x`` exits 2 before anything is imported)."""
    assert option.flag is not None  # `flagged` returns options with a flag
    if option.type is bool:
        return click.option(option.flag, option.name, is_flag=True, help=option.help)
    kwargs: dict[str, Any] = {"default": option.flag_default, "show_default": option.flag_default is not None}
    if option.choices:
        kwargs["type"] = click.Choice(option.choices)
    elif option.type is int:
        kwargs["type"] = click.IntRange(min=option.minimum) if option.minimum is not None else int
    else:
        kwargs["type"], kwargs["callback"] = option.type, _parse_check(option)
    return click.option(option.flag, option.name, help=option.help, **kwargs)


def _parse_check(option: Option) -> Callable[[click.Context, click.Parameter, Any], Any]:
    def check(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        try:
            return option.validate(value)
        except InvalidArgument as exc:
            raise click.BadParameter(str(exc)) from None

    return check


def _setup_logging(verbose: bool) -> None:
    logger = logging.getLogger("nbbatch")
    if not any(getattr(h, "_nbbatch_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._nbbatch_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbose else logging.INFO)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(EXIT_SIGTERM)


def start(launch: dict[str, Any], options: dict[str, Any], display: Display) -> int:
    """Import the processor and dataset ``launch`` names, run them, and turn the outcome into an exit code.

    ``options`` are `torch_batch_process` keywords (the store already resolved to a path).
    """
    processor, dataset = targets.load(launch, display.verbose)
    from nbbatch._api import torch_batch_process

    server = serving.serve_during_run(options["store"], display.dashboard_port) if display.dashboard else None
    try:
        run = torch_batch_process(processor, dataset, progress=display.progress, launch=launch, **options)
    except (KeyboardInterrupt, SystemExit, Exception) as exc:
        code = _failure_code(exc, display.verbose)
        if code is None:
            raise
        return code
    finally:
        serving.stop_server(server)
    if os.environ.get("RANK", "0") != "0":
        return EXIT_DONE  # under torchrun only rank 0 reports; the store lives on its machine
    return _outcome_code(run.summary)


def _failure_code(exc: BaseException, verbose: bool) -> int | None:
    """One message and the exit code of a run that raised; None for an exit to pass on as it is."""
    if isinstance(exc, KeyboardInterrupt):
        click.echo(f"nbbatch: interrupted: {exc}" if str(exc) else "nbbatch: interrupted", err=True)
        return EXIT_SIGINT
    if isinstance(exc, SystemExit):
        if exc.code != EXIT_SIGTERM:
            return None
        click.echo("nbbatch: terminated; the run committed its last checkpoint and can be resumed", err=True)
        return EXIT_SIGTERM
    if isinstance(exc, (InvalidArgument, ResumeMismatch, TypeError)):
        _report(exc, verbose)
        return EXIT_USAGE
    if not isinstance(exc, NbbatchError):  # not ours: still one message, the traceback with --verbose
        _report(exc, verbose, with_type=True)
        return EXIT_FAILED
    _report(exc, verbose)
    if isinstance(exc, WorkerFailed) and exc.run_name:
        click.echo(f"nbbatch: details: `nbbatch show {exc.run_name}`; resume: `nbbatch resume {exc.run_name}`",
                   err=True)
    return EXIT_FAILED


def _outcome_code(summary: dict[str, Any]) -> int:
    """Print the run's one-line summary; exit 0 when done, 143 when stopped (resumable), 1 otherwise."""
    click.echo(f"run {summary['name']!r} {summary['status']}: {summary['committed_batches']}/"
               f"{summary['real_batches']} batches, {summary['committed_rows']} rows, {summary['errors']} errors")
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
