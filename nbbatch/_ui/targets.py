"""Resolving what the CLI's arguments name: ``module:attr`` / ``path.py:attr`` references, stores, runs.

Every problem becomes a one-line `UsageFailure` (exit 2) naming the argument and the fix. A
module loaded from a file is registered with cloudpickle *by value*, so worker processes get its
classes and functions without importing the file, as with classes defined in a notebook. Must not
import ``_launch``, ``_worker`` or ``_store.writer``.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import os
import re
import sys
import traceback
from collections.abc import Iterable
from types import ModuleType
from typing import Any

import click

__all__ = [
    "UsageFailure", "dataset", "existing_store", "launch_info", "load", "normalize", "parse_args", "processor",
    "resolve", "run_summary", "store_path", "table", "with_inputs",
]

_FILES: dict[str, ModuleType] = {}
_NAMES_SHOWN = 12  # names a "has no attribute" message lists from the module


class UsageFailure(click.ClickException):
    """Bad usage found after parsing (a TARGET that does not import, a bad dataset): exit 2."""

    exit_code = 2


def _split(ref: str, what: str) -> tuple[str, str]:
    module, sep, attr = ref.rpartition(":")
    if not sep or not module or not attr or not all(part.isidentifier() for part in attr.split(".")):
        raise UsageFailure(
            f"{what} {ref!r} must look like `package.module:attr` or `path/to/file.py:attr`"
        )
    return module, attr


def _is_file(module: str) -> bool:
    return module.endswith(".py") or "/" in module or os.sep in module


def normalize(ref: str, what: str) -> str:
    """The reference with an absolute file path, so a resume from another folder finds it."""
    module, attr = _split(ref, what)
    if _is_file(module):
        path = os.path.abspath(os.path.expanduser(module))
        if not os.path.isfile(path):
            raise UsageFailure(f"{what} {ref!r}: no file `{path}`")
        return f"{path}:{attr}"
    return ref


def parse_args(pairs: Iterable[str]) -> dict[str, Any]:
    """``key=value`` pairs; values are JSON literals when they parse (``10``, ``true``, ``[1,2]``), else strings."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UsageFailure(f"--dataset-arg {pair!r} must look like `key=value` with a Python identifier as key")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    return out


def _load_file(path: str, verbose: bool) -> ModuleType:
    if path in _FILES:
        return _FILES[path]
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(path))[0])
    name = stem if stem.isidentifier() and stem not in sys.modules else f"_nbbatch_file_{stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageFailure(f"cannot load `{path}` as Python source; pass a `.py` file")
    module = importlib.util.module_from_spec(spec)
    folder = os.path.dirname(path)
    if folder not in sys.path:
        sys.path.insert(0, folder)  # the file's own sibling imports
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[name]
        raise _import_failure(f"running `{path}`", exc, verbose) from None
    import cloudpickle

    cloudpickle.register_pickle_by_value(module)
    _FILES[path] = module
    return module


def _import_failure(doing: str, exc: BaseException, verbose: bool) -> UsageFailure:
    if verbose:
        traceback.print_exception(exc, file=sys.stderr)
    return UsageFailure(f"{doing} raised {type(exc).__name__}: {exc} (--verbose shows the traceback)")


def resolve(ref: str, what: str, verbose: bool = False) -> Any:
    """Import ``module`` (or load the file) and return ``attr`` (dots walk attributes)."""
    module_name, attr = _split(ref, what)
    if _is_file(module_name):
        module = _load_file(os.path.abspath(os.path.expanduser(module_name)), verbose)
    else:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                raise UsageFailure(
                    f"{what} {ref!r}: no module named `{exc.name}` (searched the current directory and sys.path); "
                    f"check the spelling, or pass a file as `path/to/file.py:{attr}`"
                ) from None
            raise _import_failure(f"importing `{module_name}`", exc, verbose) from None
        except Exception as exc:
            raise _import_failure(f"importing `{module_name}`", exc, verbose) from None
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [
                n for n, v in vars(module).items()
                if not n.startswith("_") and not isinstance(v, ModuleType)
                and getattr(v, "__module__", module.__name__) == module.__name__
            ][:_NAMES_SHOWN]
            raise UsageFailure(
                f"{what} {ref!r}: `{module_name}` has no attribute `{attr}` (it defines: {', '.join(names) or 'nothing'})"
            )
        obj = getattr(obj, part)
    return obj


def processor(ref: str, verbose: bool = False) -> type[Any]:
    """The processor class named by TARGET."""
    obj = resolve(ref, "TARGET", verbose)
    if not inspect.isclass(obj) or not callable(getattr(obj, "process_batch", None)):
        kind = "a class without `process_batch`" if inspect.isclass(obj) else f"a {type(obj).__name__}"
        raise UsageFailure(
            f"TARGET {ref!r} is {kind}, not a TorchBatchProcessor subclass; point it at the class that defines "
            f"`__init__(self, context)` and `process_batch(self, batch, batch_idx)`"
        )
    return obj


def dataset(ref: str, args: dict[str, Any], verbose: bool = False) -> Any:
    """The dataset named by FACTORY: the object itself, or what calling it with ``args`` returns."""
    obj = resolve(ref, "FACTORY", verbose)
    if inspect.isclass(obj) or (callable(obj) and not hasattr(obj, "__len__")):
        try:
            obj = obj(**args)
        except Exception as exc:
            shown = ", ".join(f"{k}={v!r}" for k, v in args.items())
            raise _import_failure(f"FACTORY `{ref}({shown})`", exc, verbose) from None
    elif args:
        raise UsageFailure(
            f"--dataset-arg was given but FACTORY {ref!r} is a {type(obj).__name__}, not a callable; drop the "
            f"arguments or point FACTORY at a function that builds the dataset"
        )
    if not hasattr(obj, "__len__") or not hasattr(obj, "__getitem__"):
        raise UsageFailure(
            f"FACTORY {ref!r} gave a {type(obj).__name__}, not a map-style dataset; nbbatch needs `__len__` and "
            f"`__getitem__` (a torch Dataset, a list, ...)"
        )
    return obj


def load(launch: dict[str, Any], verbose: bool = False) -> tuple[type[Any], Any]:
    """The processor class and the dataset that `launch_info` recorded, imported from where the run started."""
    cwd = launch.get("cwd") or os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)  # like `python -m`: modules next to where the run was started
    cls = processor(launch["target"], verbose)
    if launch.get("table"):
        return cls, table(launch["table"])
    return cls, dataset(launch["dataset"], launch.get("dataset_args") or {}, verbose)


def launch_info(target: str, factory: str | None, table: str | None, dataset_args: Iterable[str]) -> dict[str, Any]:
    """What `nbbatch run` records to be resumed: TARGET, and FACTORY with its arguments or the ``--table`` source."""
    if (factory is None) == (table is None):
        raise UsageFailure("give the data once: `--dataset FACTORY` (a Dataset) or `--table SOURCE` (SQL or a file)")
    args = list(dataset_args)
    if table is not None and args:
        raise UsageFailure("--dataset-arg goes with --dataset FACTORY; with --table, put parameters in the SQL")
    launch: dict[str, Any] = {"target": normalize(target, "TARGET"), "cwd": os.getcwd()}
    if table is not None:
        launch["table"] = table  # resumed from cwd, so relative paths in the SQL keep their meaning
    else:
        launch.update({"dataset": normalize(str(factory), "FACTORY"), "dataset_args": parse_args(args)})
    return launch


def with_inputs(con: Any, run: str, run_id: str, query: str, columns: list[str]) -> str:
    """``query`` (the run's outputs) joined to its input rows, for ``export --with-inputs``."""
    from nbbatch._errors import StoreError
    from nbbatch._store import inputs

    try:
        joined = inputs.joined_sql(con, run_id, query, columns)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if joined is None:
        raise UsageFailure(f"run {run!r} did not start on a table (`--table` / TableDataset), so it kept no input "
                           f"rows; drop --with-inputs")
    return joined


def table(source: str) -> Any:
    """The `TableDataset` of ``--table SOURCE``; a query that fails or a missing file is bad usage."""
    from nbbatch._errors import InvalidDataset
    from nbbatch._table import TableDataset

    try:
        return TableDataset(source)
    except InvalidDataset as exc:
        raise UsageFailure(f"--table: {exc}") from None


def store_path(path: str | None) -> str:
    """The store's absolute path: ``--store``, else ``$NBBATCH_STORE`` or ``./nbbatch.duckdb``."""
    from nbbatch._run import default_store

    return os.path.abspath(path or default_store())


def existing_store(path: str | None) -> str:
    """Like `store_path`, for commands that read: a missing file is bad usage."""
    store = store_path(path)
    if not os.path.exists(store):
        raise UsageFailure(f"no store at `{store}`; pass `--store PATH` (or set $NBBATCH_STORE)")
    return store


def run_summary(store: str, run: str) -> dict[str, Any]:
    """The run's row and counts; an unknown run is bad usage, an unreadable store a failure."""
    from nbbatch._errors import RunNotFound, StoreError
    from nbbatch._store import reader

    try:
        with reader.reading(store) as con:
            return reader.run_summary(con, run)
    except RunNotFound as exc:
        raise UsageFailure(str(exc)) from None
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
