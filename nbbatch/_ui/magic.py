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

from nbbatch._help import OPTION_HELP

__all__ = ["BatchMagics"]

# How long `--background` waits for the run to appear in the store before giving up.
START_TIMEOUT = 120.0

# Background runs started by this kernel, by store path: (variable name, Run).
_BACKGROUND: dict[str, tuple[str, Any]] = {}


def new_run_name(clock: Any = time) -> str:
    """``nb-YYYYmmdd-HHMMSS-xxxx``: chosen up front so a background run can be opened by name."""
    return str(clock.strftime("nb-%Y%m%d-%H%M%S-")) + uuid.uuid4().hex[:4]


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
    @argument("--batch-size", type=int, default=None, help=OPTION_HELP["batch_size"])
    @argument("--processes", type=int, default=None, help=OPTION_HELP["num_processes"])
    @argument("--checkpoint-interval", type=int, default=5, help=OPTION_HELP["checkpoint_interval"])
    @argument("--max-batches", type=int, default=None, help=OPTION_HELP["max_batches"])
    @argument("--name", default=None, help=OPTION_HELP["run_name"] + " Default: nb-<date>-<time>-<random>.")
    @argument("--store", default=None, help=OPTION_HELP["store"])
    @argument("--on-error", choices=["raise", "skip"], default="raise", help=OPTION_HELP["on_error"])
    @argument("--max-failures", type=int, default=None, help=OPTION_HELP["max_failures"])
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
        _check_options(args)
        if cell is None:
            processor, dataset = self._line_targets(args)
        else:
            processor, dataset = self._cell_targets(args, cell)
        store = os.path.abspath(args.store) if args.store else None
        kwargs: dict[str, Any] = {
            "batch_size": args.batch_size, "max_batches": args.max_batches,
            "checkpoint_interval": args.checkpoint_interval, "num_processes": args.processes, "store": store,
            "run_name": args.name or new_run_name(), "on_error": args.on_error, "max_failures": args.max_failures,
        }
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
            _explain_resume(exc, kwargs["run_name"], named=args.name is not None)
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
                _explain_resume(exc, kwargs["run_name"], named=args.name is not None)
                failure.append(exc)
                _show_error(reporter, exc)

        # No copied context: ipykernel then tags the thread's messages with the cell running at
        # the time, so frontends that route by cell (nbclient) still apply the display updates.
        thread = threading.Thread(target=work, daemon=True, name=f"nbbatch-{kwargs['run_name']}")
        thread.start()
        deadline = time.monotonic() + START_TIMEOUT
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
                        f"{START_TIMEOUT:.0f} s; check the store path"
                    ) from None
                time.sleep(0.05)
        run._thread = thread
        run._failure = failure
        _BACKGROUND[run.store] = (args.out, run)
        self._shell.user_ns[args.out] = run
        return run


# Option -> smallest valid value; the core checks them too, but a cell should show one line, not a traceback.
_MINIMUM = {"batch_size": ("--batch-size", 1), "processes": ("--processes", 1),
            "checkpoint_interval": ("--checkpoint-interval", 1), "max_failures": ("--max-failures", 0)}


def _check_options(args: Any) -> None:
    """Bad numbers and run names are bad usage: a one-line `UsageError` before anything runs."""
    from nbbatch._store.schema import check_run_name

    for dest, (option, minimum) in _MINIMUM.items():
        value = getattr(args, dest)
        if value is not None and value < minimum:
            raise UsageError(f"{option} must be at least {minimum}, got {value}")
    if args.name is not None:
        try:
            check_run_name(args.name)
        except ValueError as exc:
            raise UsageError(f"--name: {exc}") from None


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

    return isinstance(exc, NbbatchError) or (isinstance(exc, KeyboardInterrupt) and "preempted" in str(exc))


def _raise_in_cell(exc: BaseException) -> None:
    """Re-raise without the launcher's frames: the message has the cause, the fix and any worker traceback."""
    raise exc.with_traceback(None)  # see the message below


def _explain_resume(exc: BaseException, name: str, named: bool) -> None:
    """A preempted or failed run resumes under its name; a generated name must be passed back."""
    from nbbatch._errors import RunFailed, WorkerFailed

    if not (isinstance(exc, (WorkerFailed, RunFailed)) or (isinstance(exc, KeyboardInterrupt) and "preempted" in str(exc))):
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
    if holder is not None and holder[1]._thread is not None and holder[1]._thread.is_alive():
        exc.add_note(
            f"%batchprocess: the background run in `{holder[0]}` ({holder[1].name!r}) holds this store; "
            f"`{holder[0]}.wait()` for it or `{holder[0]}.stop()` it, or pass --store OTHER.duckdb"
        )
    else:
        exc.add_note("%batchprocess: pass --store OTHER.duckdb to run beside the live run")
