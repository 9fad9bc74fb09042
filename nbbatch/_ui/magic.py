"""``%batchprocess`` and ``%%batchprocess``: run a processor from a notebook cell.

The magic only parses its line into `torch_batch_process` arguments; bad usage is a one-line
`UsageError`, errors of the run itself propagate as they are. The `Run` is left in the user's
namespace (``--out``, default ``_run``) even when the run fails or is interrupted.
"""

from __future__ import annotations

import inspect
import threading
import time
import uuid
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring

from nbbatch._help import OPTION_HELP

__all__ = ["BatchMagics"]


def _new_name() -> str:
    return time.strftime("nb-%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:4]


@magics_class
class BatchMagics(Magics):
    """The ``%batchprocess`` line and cell magics."""

    @magic_arguments()
    @argument("processor", nargs="?", help="Name of a TorchBatchProcessor subclass (line magic).")
    @argument("dataset", nargs="?", help="Name of a map-style dataset (line magic).")
    @argument("--dataset", dest="dataset_name", default=None, help="Dataset name (cell magic).")
    @argument("--processor", dest="processor_name", default=None,
              help="Which class the cell defines to run (cell magic; default: the one it defines).")
    @argument("--batch-size", type=int, default=None, help=OPTION_HELP["batch_size"])
    @argument("--processes", type=int, default=None, help=OPTION_HELP["num_processes"])
    @argument("--checkpoint-interval", type=int, default=5, help=OPTION_HELP["checkpoint_interval"])
    @argument("--max-batches", type=int, default=None, help=OPTION_HELP["max_batches"])
    @argument("--name", default=None, help=OPTION_HELP["run_name"])
    @argument("--store", default=None, help=OPTION_HELP["store"])
    @argument("--on-error", choices=["raise", "skip"], default="raise", help=OPTION_HELP["on_error"])
    @argument("--max-failures", type=int, default=None, help=OPTION_HELP["max_failures"])
    @argument("--out", default="_run", help="Variable that receives the Run (default: _run).")
    @argument("--background", action="store_true", help="Return the Run at once; the display stays live.")
    @argument("--no-progress", action="store_true", help="No live display.")
    @line_cell_magic
    def batchprocess(self, line: str, cell: str | None = None) -> Any:
        """Run a TorchBatchProcessor over a dataset with live progress; outputs go to DuckDB.

        Line magic::

            %batchprocess MyProcessor dataset --batch-size 64 --processes 2 --name nightly

        Cell magic (runs the class the cell defines)::

            %%batchprocess --dataset dataset --batch-size 64
            class MyProcessor(TorchBatchProcessor):
                ...

        Interrupt the kernel to stop at the next checkpoint; run the same line with the same
        ``--name`` to resume.
        """
        args = parse_argstring(self.batchprocess, line)
        ns = self._shell.user_ns
        if cell is None:
            if args.processor is None or (args.dataset is None and args.dataset_name is None):
                raise UsageError("usage: %batchprocess Processor dataset [options]; see %batchprocess?")
            processor = self._lookup(args.processor, "processor class")
            dataset = self._lookup(args.dataset or args.dataset_name, "dataset")
        else:
            if args.dataset_name is None and args.dataset is None:
                raise UsageError("%%batchprocess needs --dataset NAME (the dataset to process)")
            processor = self._run_cell_for_processor(cell, args.processor_name or args.processor)
            dataset = self._lookup(args.dataset_name or args.dataset, "dataset")
        if not inspect.isclass(processor):
            raise UsageError(f"{args.processor or args.processor_name!r} is not a class; pass a TorchBatchProcessor subclass")
        name = args.name or _new_name()
        kwargs = dict(
            batch_size=args.batch_size, max_batches=args.max_batches, checkpoint_interval=args.checkpoint_interval,
            num_processes=args.processes, store=args.store, run_name=name, on_error=args.on_error,
            max_failures=args.max_failures,
        )
        if args.background:
            return self._background(processor, dataset, kwargs, args)
        return self._blocking(processor, dataset, kwargs, args)

    # -- helpers --------------------------------------------------------------------------------
    @property
    def _shell(self) -> Any:
        """The shell the magics are registered in (IPython types it as optional)."""
        if self.shell is None:  # pragma: no cover - registered magics always have a shell
            raise UsageError("%batchprocess needs an IPython shell")
        return self.shell

    def _lookup(self, name: str, what: str) -> Any:
        ns = self._shell.user_ns
        if name not in ns:
            raise UsageError(f"no {what} named {name!r} in the notebook; define it in a cell first")
        return ns[name]

    def _run_cell_for_processor(self, cell: str, chosen: str | None) -> Any:
        from nbbatch._processor import TorchBatchProcessor

        ns = self._shell.user_ns
        before = {k: id(v) for k, v in ns.items()}
        result = self._shell.run_cell(cell)
        if not result.success:
            raise UsageError("the cell raised before defining a processor; fix the error shown above")
        if chosen is not None:
            return self._lookup(chosen, "processor class")
        new = [
            v for k, v in ns.items()
            if inspect.isclass(v) and issubclass(v, TorchBatchProcessor) and v is not TorchBatchProcessor
            and before.get(k) != id(v)
        ]
        if not new:
            raise UsageError("the cell defines no TorchBatchProcessor subclass; define one, or pass --processor NAME")
        if len(new) > 1:
            names = ", ".join(sorted(c.__name__ for c in new))
            raise UsageError(f"the cell defines several processors ({names}); choose one with --processor NAME")
        return new[0]

    def _reporter(self, args: Any) -> Any:
        if args.no_progress:
            return False
        from nbbatch._ui.widgets import widget_reporter

        return widget_reporter()

    def _open(self, name: str, store: str | None) -> Any:
        from nbbatch._run import open_run

        return open_run(name, store=store)

    def _blocking(self, processor: Any, dataset: Any, kwargs: dict[str, Any], args: Any) -> Any:
        from nbbatch._api import torch_batch_process
        from nbbatch._errors import RunNotFound, StoreError

        try:
            run = torch_batch_process(processor, dataset, progress=self._reporter(args), **kwargs)
        except BaseException:
            try:
                self._shell.user_ns[args.out] = self._open(kwargs["run_name"], kwargs["store"])
            except (RunNotFound, StoreError):
                pass
            raise
        self._shell.user_ns[args.out] = run
        return run

    def _background(self, processor: Any, dataset: Any, kwargs: dict[str, Any], args: Any) -> Any:
        from nbbatch._api import torch_batch_process
        from nbbatch._errors import RunNotFound, StoreError

        reporter = self._reporter(args)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                torch_batch_process(processor, dataset, progress=reporter, **kwargs)
            except BaseException as exc:  # shown in the display and raised by the next `Run.wait()` caller
                failure.append(exc)

        thread = threading.Thread(target=work, name=f"nbbatch-{kwargs['run_name']}", daemon=True)
        thread.start()
        deadline = time.monotonic() + 120
        while True:
            if failure:
                raise failure[0]
            try:
                run = self._open(kwargs["run_name"], kwargs["store"])
                break
            except (RunNotFound, StoreError):  # the store or the run is not created yet
                if time.monotonic() > deadline:
                    raise UsageError("the background run did not start within 120 s") from None
                time.sleep(0.05)
        run._thread = thread
        run._failure = failure
        self._shell.user_ns[args.out] = run
        return run
