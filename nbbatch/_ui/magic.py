"""``%batchprocess`` and ``%%batchprocess``: run a processor from a notebook cell.

The magic only parses its line into `torch_batch_process` keyword arguments and picks the
display; it has no engine logic. Bad usage is a one-line `UsageError` (that exact class, so
IPython shows no traceback); errors of the run itself (`WorkerFailed`, `StoreBusy`,
`KeyboardInterrupt` after a preemption) propagate as they are. The `Run` is left in the user's
namespace (``--out``, default ``_run``) even when the run fails or is interrupted. Reads ``_api``
and ``_run`` lazily, so ``%load_ext nbbatch`` does not import torch.
"""

from __future__ import annotations

import inspect
import logging
import os
import threading
import time
import uuid
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbbatch._errors import InvalidArgument
from nbbatch._events import Status
from nbbatch._options import OPTION_HELP, Option, flagged

__all__ = ["BatchMagics"]

# How long `--background` waits for the run to appear in the store before giving up, and how often it looks.
START_TIMEOUT_SECONDS = 120.0
START_POLL_SECONDS = 0.05

# What the magic adds to an option's help text from the table.
_HELP_SUFFIX = {"run_name": " Default: nb-<date>-<time>-<random>."}

# Background runs started by this kernel, by store path: (variable name, Run).
_BACKGROUND: dict[str, tuple[str, Any]] = {}


def new_run_name(clock: Any = time) -> str:
    """``nb-YYYYmmdd-HHMMSS-xxxx``: chosen up front so a background run can be opened by name."""
    return str(clock.strftime("nb-%Y%m%d-%H%M%S-")) + uuid.uuid4().hex[:4]


def _run_arguments(magic: Any) -> Any:
    """The run options of the table as arguments (``dest`` is the `torch_batch_process` keyword)."""
    for option in reversed(flagged("magic")):
        magic = argument(str(option.flag), dest=option.name, help=option.help + _HELP_SUFFIX.get(option.name, ""),
                         **_parsing(option))(magic)
    return magic


def _parsing(option: Option) -> dict[str, Any]:
    """How argparse reads the option: a flag, a choice, or a value of the option's type named after the flag."""
    if option.type is bool:
        return {"action": "store_true"}
    if option.choices:
        return {"choices": list(option.choices), "default": option.flag_default}
    metavar = str(option.flag).lstrip("-").upper().replace("-", "_")  # `--batch-size BATCH_SIZE`
    return {"type": option.type, "default": option.flag_default, "metavar": metavar}


@magics_class
class BatchMagics(Magics):
    """The ``%batchprocess`` line and cell magics."""

    @magic_arguments()
    @argument("processor", nargs="?", help="Name of a TorchBatchProcessor subclass (line magic).")
    @argument("dataset", nargs="?", help="Name of a map-style dataset (line magic).")
    @argument("--dataset", dest="dataset_name", default=None, help="Dataset name (cell magic).")
    @argument("--table", default=None, help=OPTION_HELP["table"])
    @argument("--processor", dest="processor_name", default=None,
              help="Which class the cell defines to run (cell magic; default: the only one it defines).")
    @_run_arguments
    @argument("--out", default="_run", help="Variable that receives the Run (default: _run).")
    @argument("--background", action="store_true",
              help="Return the Run at once; the display stays live. `run.wait()` blocks, `run.stop()` preempts.")
    @argument("--no-progress", action="store_true", help="No live display.")
    @line_cell_magic
    def batchprocess(self, line: str, cell: str | None = None) -> Any:
        """Run a TorchBatchProcessor over a dataset with a live display; outputs go to DuckDB.

        Line magic (names are looked up in the notebook)::

            %batchprocess MyProcessor dataset --batch-size 64 --processes 2 --name nightly
            %batchprocess MyProcessor --table "SELECT id, path FROM 'in.parquet' ORDER BY id"

        Cell magic (runs the cell, then the TorchBatchProcessor subclass it defines)::

            %%batchprocess --dataset dataset --batch-size 64
            class MyProcessor(TorchBatchProcessor):
                ...

        The `Run` lands in ``_run`` (or ``--out NAME``). Interrupt the kernel to stop at the next
        checkpoint (committed, status ``preempted``); run the same line with the same ``--name``
        to resume. With ``--background`` the cell returns at once: ``run.wait()`` joins,
        ``run.stop()`` preempts.
        """
        __tracebackhide__ = True  # IPython shows the cell line and the error, not the magic's frames
        args = parse_argstring(self.batchprocess, line)
        if not args.out.isidentifier():
            raise UsageError(f"--out must be a Python variable name, got {args.out!r}")
        kwargs = _run_options(args)
        if cell is None:
            processor, dataset = self._line_targets(args)
        else:
            processor, dataset = self._cell_targets(args, cell)
        kwargs["run_name"] = kwargs["run_name"] or new_run_name()
        if args.background:
            return self._background(processor, dataset, kwargs, args)
        return self._blocking(processor, dataset, kwargs, args)

    # -- parsing --------------------------------------------------------------------------------
    @property
    def _shell(self) -> Any:
        """The shell the magics are registered in (IPython types it as optional)."""
        if self.shell is None:  # pragma: no cover - registered magics always have a shell
            raise UsageError("%batchprocess needs an IPython shell")
        return self.shell

    def _lookup(self, name: str, what: str) -> Any:
        ns = self._shell.user_ns
        if name not in ns:
            raise UsageError(f"no {what} named {name!r} in the notebook; define it in a cell first, or check the spelling")
        return ns[name]

    def _line_targets(self, args: Any) -> tuple[Any, Any]:
        names = [n for n in (args.processor, args.dataset) if n is not None]
        processor_name = args.processor_name or (names.pop(0) if names else None)
        dataset_name = args.dataset_name or (names.pop(0) if names else None)
        if processor_name is None:
            raise UsageError("usage: %batchprocess Processor dataset [options] (see %batchprocess?)")
        if dataset_name is None and args.table is None:
            raise UsageError(f"%batchprocess {processor_name} needs a dataset: %batchprocess {processor_name} dataset "
                             f"(or --table \"SELECT ...\")")
        if names:
            raise UsageError(f"unexpected name {names[0]!r}: give the processor and the dataset once each")
        processor = _check_processor_class(self._lookup(processor_name, "processor class"), processor_name)
        return processor, self._data(args, dataset_name)

    def _data(self, args: Any, name: str | None) -> Any:
        """The dataset named in the notebook, or the `TableDataset` of ``--table``."""
        if args.table is None:
            return self._lookup(str(name), "dataset")
        if name is not None:
            raise UsageError(f"give the data once: the dataset {name!r} or --table, not both")
        from nbbatch._errors import InvalidDataset
        from nbbatch._table import TableDataset

        source = args.table
        if len(source) >= 2 and source[0] == source[-1] and source[0] in "\"'":
            source = source[1:-1]  # IPython's argument split keeps the quotes around `--table "SELECT ..."`
        try:
            return TableDataset(source)
        except InvalidDataset as exc:
            raise UsageError(f"--table: {exc}") from None

    def _cell_targets(self, args: Any, cell: str) -> tuple[Any, Any]:
        if args.processor is not None:
            raise UsageError("%%batchprocess takes no positional names; use --dataset NAME [--processor NAME]")
        if args.dataset_name is None and args.table is None:
            raise UsageError("%%batchprocess needs --dataset NAME (the dataset to process) or --table SOURCE")
        processor = self._run_cell_for_processor(cell, args.processor_name)
        return processor, self._data(args, args.dataset_name)

    def _run_cell_for_processor(self, cell: str, chosen: str | None) -> Any:
        """Run the cell in the user namespace (its errors propagate as they are), diff the names."""
        from nbbatch._processor import TorchBatchProcessor

        shell = self._shell
        ns = shell.user_ns
        before = {k: id(v) for k, v in ns.items()}
        code = shell.transform_cell(cell)
        filename = shell.compile.cache(code, shell.execution_count, raw_code=cell)
        exec(compile(code, filename, "exec"), shell.user_global_ns, ns)  # noqa: S102 - running the user's cell is the point
        if chosen is not None:
            return _check_processor_class(self._lookup(chosen, "processor class"), chosen)
        new = sorted(
            (k for k, v in ns.items()
             if inspect.isclass(v) and issubclass(v, TorchBatchProcessor) and v is not TorchBatchProcessor
             and before.get(k) != id(v)),
        )
        if not new:
            raise UsageError("the cell defines no TorchBatchProcessor subclass; define one, or name one with --processor NAME")
        if len(new) > 1:
            raise UsageError(f"the cell defines several processors ({', '.join(new)}); choose one with --processor NAME")
        return ns[new[0]]

    # -- running --------------------------------------------------------------------------------
    def _reporter(self, args: Any, store: str | None) -> Any:
        if args.no_progress:
            return False
        from nbbatch._run import default_store
        from nbbatch._ui.widgets import widget_reporter

        return widget_reporter(store or os.path.abspath(default_store()))

    def _leave_run(self, out: str, name: str, store: str | None) -> Any:
        """Put the run (if it exists) in the namespace, e.g. a failed or preempted one."""
        from nbbatch._errors import NbbatchError
        from nbbatch._run import open_run

        try:
            run = open_run(name, store=store)
        except NbbatchError:
            return None
        self._shell.user_ns[out] = run
        return run

    def _blocking(self, processor: Any, dataset: Any, kwargs: dict[str, Any], args: Any) -> Any:
        from nbbatch._api import torch_batch_process
        from nbbatch._run import Run

        __tracebackhide__ = True
        reporter = self._reporter(args, kwargs["store"])
        try:
            run: Run = torch_batch_process(processor, dataset, progress=reporter, **kwargs)
        except BaseException as exc:
            _usage_error(exc)
            _show_error(reporter, exc)
            _explain_busy(exc, kwargs["store"])
            _explain_resume(exc, kwargs["run_name"], named=args.run_name is not None)
            self._leave_run(args.out, kwargs["run_name"], kwargs["store"])
            if _is_expected(exc):
                _raise_in_cell(exc)
            raise
        self._shell.user_ns[args.out] = run
        return run

    def _background(self, processor: Any, dataset: Any, kwargs: dict[str, Any], args: Any) -> Any:
        from nbbatch._api import torch_batch_process
        from nbbatch._errors import NbbatchError
        from nbbatch._run import open_run

        reporter = self._reporter(args, kwargs["store"])
        failure: list[BaseException] = []

        def work() -> None:
            try:
                torch_batch_process(processor, dataset, progress=reporter, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - shown in the display; `Run.wait()` raises it
                _explain_resume(exc, kwargs["run_name"], named=args.run_name is not None)
                failure.append(exc)
                _show_error(reporter, exc)

        # No copied context: ipykernel then tags the thread's messages with the cell running at
        # the time, so frontends that route by cell (nbclient) still apply the display updates.
        thread = threading.Thread(target=work, daemon=True, name=f"nbbatch-{kwargs['run_name']}")
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        __tracebackhide__ = True
        while True:
            if failure:
                _usage_error(failure[0])
                _explain_busy(failure[0], kwargs["store"])
                self._leave_run(args.out, kwargs["run_name"], kwargs["store"])
                if _is_expected(failure[0]):
                    _raise_in_cell(failure[0])
                raise failure[0]
            try:
                run = open_run(kwargs["run_name"], store=kwargs["store"])
                break
            except NbbatchError:  # the store or the run is not there yet
                if not thread.is_alive() and not failure:
                    raise UsageError(f"the background run {kwargs['run_name']!r} ended without being stored") from None
                if time.monotonic() > deadline:
                    raise UsageError(
                        f"the background run {kwargs['run_name']!r} did not appear in the store within "
                        f"{START_TIMEOUT_SECONDS:.0f} s; check the store path"
                    ) from None
                time.sleep(START_POLL_SECONDS)
        run.attach_background(thread, failure)
        _BACKGROUND[run.store] = (args.out, run)
        self._shell.user_ns[args.out] = run
        return run


def _run_options(args: Any) -> dict[str, Any]:
    """The run options of the line, checked by their records: a bad value is bad usage, one
    `UsageError` line before anything runs (the core checks them too, but with a traceback)."""
    values: dict[str, Any] = {}
    for option in flagged("magic"):
        value = getattr(args, option.name)
        if value is not None and option.minimum is not None and value < option.minimum:
            raise UsageError(f"{option.flag} must be at least {option.minimum}, got {value}")
        try:
            values[option.name] = option.validate(value)
        except InvalidArgument as exc:
            raise UsageError(f"{option.flag}: {exc}") from None
    return values


def _usage_error(exc: BaseException) -> None:
    """An argument the core refused before starting (`InvalidArgument`) is bad usage: one line, no traceback."""
    from nbbatch._errors import InvalidArgument

    if isinstance(exc, InvalidArgument):
        raise UsageError(" ".join(str(exc).split())) from None


def _check_processor_class(value: Any, name: str) -> Any:
    if not inspect.isclass(value):
        raise UsageError(f"{name!r} is a {type(value).__name__}, not a class; pass a TorchBatchProcessor subclass")
    if not callable(getattr(value, "process_batch", None)):
        raise UsageError(f"{name!r} has no `process_batch`; pass a TorchBatchProcessor subclass")
    return value


def _show_error(reporter: Any, exc: BaseException) -> None:
    show = getattr(reporter, "show_error", None)
    if show is not None:
        try:
            show(exc)
        except Exception:  # a broken display must not hide the run's own error
            logging.getLogger("nbbatch").exception("progress display failed")


def _is_expected(exc: BaseException) -> bool:
    """An error nbbatch raised on purpose, or the interrupt after a preemption: its text says it all."""
    from nbbatch._errors import NbbatchError

    return isinstance(exc, NbbatchError) or _is_preemption(exc)


def _is_preemption(exc: BaseException) -> bool:
    """The `KeyboardInterrupt` a preempted run ends with; only its message tells it from a plain one.

    A subclass would say it by type, but Python exits by SIGINT (code 130) only for an uncaught
    `KeyboardInterrupt` of exactly that type, which scripts and batch systems rely on.
    """
    return isinstance(exc, KeyboardInterrupt) and f" {Status.PREEMPTED} " in str(exc)


def _raise_in_cell(exc: BaseException) -> None:
    """Re-raise without the launcher's frames: the message has the cause, the fix and any worker traceback."""
    raise exc.with_traceback(None)  # see the message below


def _explain_resume(exc: BaseException, name: str, named: bool) -> None:
    """A preempted or failed run resumes under its name; a generated name must be passed back."""
    from nbbatch._errors import RunFailed, WorkerFailed

    if not (isinstance(exc, (WorkerFailed, RunFailed)) or _is_preemption(exc)):
        return
    how = "run the same line again" if named else f"run the line again with `--name {name}`"
    exc.add_note(f"%batchprocess: to resume (committed batches are kept), {how}")


def _explain_busy(exc: BaseException, store: str | None) -> None:
    """Add a notebook hint to `StoreBusy`: which background run of this kernel holds the store."""
    from nbbatch._errors import StoreBusy
    from nbbatch._run import default_store

    if not isinstance(exc, StoreBusy) or getattr(exc, "_nbbatch_explained", False):
        return
    exc._nbbatch_explained = True  # type: ignore[attr-defined]
    path = store or os.path.abspath(default_store())
    holder = _BACKGROUND.get(path)
    if holder is not None and holder[1].running_in_background:
        exc.add_note(
            f"%batchprocess: the background run in `{holder[0]}` ({holder[1].name!r}) holds this store; "
            f"`{holder[0]}.wait()` for it or `{holder[0]}.stop()` it, or pass --store OTHER.duckdb"
        )
    else:
        exc.add_note("%batchprocess: pass --store OTHER.duckdb to run beside the live run")
