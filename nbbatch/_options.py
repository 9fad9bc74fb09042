"""The run options, defined once: one `Option` record each, and `RunConfig`, the validated set.

`torch_batch_process` checks its keywords with these records (`validate`), ``nbbatch run`` and
``nbbatch resume`` build their click options from them and ``%batchprocess`` its arguments, so
an option's name, type, default, help text, rule and flag are written here only. Error messages
are the API's (Determined's words where Determined checks). It owns the run-name rule too, which
``_store.schema`` re-exports. Imports only ``_errors`` from nbbatch (no torch, no click), so
``nbbatch --help`` and ``%load_ext nbbatch`` stay quick.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from nbbatch._errors import InvalidArgument, InvalidRunName

__all__ = [
    "DEFAULT_BATCH_SIZE", "OPTIONS", "OPTION_HELP", "RUN_NAME_RULE", "TABLE_HELP", "OnError", "Option", "Place",
    "RunConfig", "check_run_name", "flagged", "option", "stored_values", "validate",
]

OnError = Literal["raise", "skip"]
# Where an option has a flag: `nbbatch run`, `nbbatch resume`, `%batchprocess`.
Place = Literal["run", "resume", "magic"]

DEFAULT_BATCH_SIZE = 1  # when neither `batch_size` nor `dataloader_kwargs["batch_size"]` is given

RUN_NAME_RULE = "letters, digits and `._-`, not starting with `-` or `.`"
_RUN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")

# Help of `--table`: a data source of the CLI and the magic, not an option of the run itself.
TABLE_HELP = (
    "Instead of a dataset: DuckDB SQL (\"SELECT ... ORDER BY id\", quoted) or a .parquet/.csv/.json path, read as "
    "a TableDataset; batches are dicts of column -> tensor or list, and the run keeps the rows "
    "(outputs(inputs=True), export --with-inputs)."
)


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a safe run name, else raise `InvalidRunName` giving the rule.

    Names appear in command lines, logs and URLs, so only a safe set is allowed.

    Example:
        >>> check_run_name("nightly-2024.01_a")
        'nightly-2024.01_a'
    """
    if not isinstance(name, str) or not _RUN_NAME.fullmatch(name):
        raise InvalidRunName(
            f"a run name must be {RUN_NAME_RULE}, got {name!r}; choose a name such as `nightly-2024.01`"
        )
    return name


@dataclass(frozen=True)
class Option:
    """One option of a run: what `torch_batch_process` takes, checks, and the front ends offer.

    Attributes:
        name: the `torch_batch_process` keyword (and, but for `trust`, a `RunConfig` field).
        type: the value's type; the front ends parse their flag's text into it.
        default: `torch_batch_process`'s default; None means "unset" and is never checked.
        help: one help text for the CLI, the magic and the docs.
        check: ``check(option, value)`` returns the value to use or raises `InvalidArgument`.
        flag: the flag of the front ends (the same on the CLI and in the magic), or None.
        places: where the flag is offered.
        none_means: what an unset value becomes where that is fixed (shown as the flag's default).
        minimum: the smallest valid number; the front ends refuse less while parsing.
        choices: the valid values of a choice.
        stored: the runs table keeps it in a column of the same name; ``nbbatch resume`` reads it back.
    """

    name: str
    type: type
    default: Any
    help: str
    check: Callable[[Option, Any], Any]
    flag: str | None = None
    places: tuple[Place, ...] = ()
    none_means: Any = None
    minimum: int | None = None
    choices: tuple[str, ...] = ()
    stored: bool = False

    @property
    def flag_default(self) -> Any:
        """What a front end passes when its flag is not given (and shows as the default)."""
        return self.none_means if self.default is None else self.default

    def validate(self, value: Any) -> Any:
        """The value to use; None stays None where it means "unset"."""
        if value is None and self.default is None:
            return None
        return self.require(value)

    def require(self, value: Any) -> Any:
        """The value to use, where None is not "unset" (a default being resolved, say)."""
        return self.check(self, value)


def _integer(option: Option, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"`{option.name}` must be an integer, got {value!r}")
    if option.minimum is not None and value < option.minimum:
        raise InvalidArgument(f"`{option.name}` must be >= {option.minimum}, got {value}")
    return value


def _checkpoint_interval(option: Option, value: Any) -> int:
    """Determined's words."""
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise InvalidArgument("checkpoint_interval should be a positive integer")
    return value


def _max_batches(option: Option, value: Any) -> int:
    """Any integer: Determined's rule (`_api._validate_iterate_length`) warns about invalid ones and ignores them."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(f"`{option.name}` must be an integer or None, got {value!r}")
    return value


def _choice(option: Option, value: Any) -> str:
    if value not in option.choices:
        allowed = " or ".join(f'"{choice}"' for choice in option.choices)
        raise InvalidArgument(f"`{option.name}` must be {allowed}, got {value!r}")
    return str(value)


def _seconds(option: Option, value: Any) -> float:
    """A finite positive number of seconds; NaN would compare False and disable the timeout."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise InvalidArgument(
            f"`{option.name}` must be a finite positive number of seconds, or None for no limit; got {value!r}"
        )
    return value


def _flag(option: Option, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidArgument(f"`{option.name}` must be True or False, got {value!r}")
    return value


def _store_file(option: Option, value: Any) -> str:
    """The absolute path of a store file; a folder is refused with the file name to use."""
    path: str = os.path.abspath(os.fspath(value))
    if os.path.isdir(path):
        raise InvalidArgument(f"`store` must be a file path such as `{os.path.join(path, 'nbbatch.duckdb')}`, not a folder")
    return path


def _run_name(option: Option, value: Any) -> str:
    return check_run_name(value)


def _copy(option: Option, value: Any) -> dict[str, Any]:
    """A copy: the caller's dict is never modified (``batch_size`` is popped from it)."""
    return dict(value)


def _as_given(option: Option, value: Any) -> Any:
    return value


_CLI_RUN: tuple[Place, ...] = ("run", "magic")
_EVERYWHERE: tuple[Place, ...] = ("run", "resume", "magic")

OPTIONS: tuple[Option, ...] = (
    Option("batch_size", int, None, "Samples per batch.", _integer, "--batch-size", _CLI_RUN,
           none_means=DEFAULT_BATCH_SIZE, minimum=1, stored=True),
    Option("max_batches", int, None, "Cap on batches per worker; invalid values warn and are ignored.", _max_batches,
           "--max-batches", _CLI_RUN, stored=True),
    Option("checkpoint_interval", int, 5, "Commit every this many batches per worker.", _checkpoint_interval,
           "--checkpoint-interval", _CLI_RUN, minimum=1, stored=True),
    Option("dataloader_kwargs", dict, None, "Passed to torch.utils.data.DataLoader (no shuffle, sampler or "
           "batch_sampler).", _copy),
    Option("num_processes", int, None, "Local worker processes (default: one per GPU, else 1; leave unset under "
           "torchrun).", _integer, "--processes", _EVERYWHERE, minimum=1),
    Option("store", str, None, "DuckDB store file (default: $NBBATCH_STORE or ./nbbatch.duckdb).", _store_file,
           "--store", _EVERYWHERE),
    Option("run_name", str, None, "Run name (letters, digits and ._-, not starting with - or .); naming an "
           "unfinished run resumes it, a finished one is returned as is.", _run_name, "--name", _CLI_RUN),
    Option("on_error", str, "raise", "`raise`: stop at the first failing batch; `skip`: record it and go on.",
           _choice, "--on-error", _CLI_RUN, choices=("raise", "skip"), stored=True),
    Option("max_failures", int, None, "With on_error=skip: fail the run once more batches than this failed.",
           _integer, "--max-failures", _CLI_RUN, minimum=0, stored=True),
    Option("batch_timeout", float, None, "Fail the run if one process_batch call runs longer than this many "
           "seconds (finite, > 0).", _seconds),
    Option("launch", dict, None, "How to re-create the processor and dataset (set by `nbbatch run`, for resume "
           "buttons).", _as_given),
    Option("trust", bool, False, "Run and sign records you did not sign (see `nbbatch trust`).", _flag, "--trust",
           ("resume",)),  # checked here, carried by the run's records rather than by `RunConfig`
)

_BY_NAME = {o.name: o for o in OPTIONS}

OPTION_HELP: dict[str, str] = {**{o.name: o.help for o in OPTIONS}, "table": TABLE_HELP}


def option(name: str) -> Option:
    """The record of the option ``name`` (a `torch_batch_process` keyword)."""
    return _BY_NAME[name]


def flagged(place: Place) -> tuple[Option, ...]:
    """The options with a flag in ``place``, in the table's order (the order of the help)."""
    return tuple(o for o in OPTIONS if place in o.places)


def validate(given: Mapping[str, Any]) -> dict[str, Any]:
    """Every option's check, in the table's order; returns the values to use (None where unset).

    Example:
        >>> validate({"batch_size": 4})["checkpoint_interval"]
        5
    """
    return {o.name: o.validate(given.get(o.name, o.default)) for o in OPTIONS}


def stored_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """The options a run's row keeps (``stored``), for ``nbbatch resume``; a NULL is the default."""
    return {o.name: o.default if row.get(o.name) is None else row[o.name] for o in OPTIONS if o.stored}


@dataclass(frozen=True)
class RunConfig:
    """The validated options of one call; the magic and the CLI only parse into this."""

    batch_size: int
    max_batches: int | None
    checkpoint_interval: int
    dataloader_kwargs: dict[str, Any]
    num_processes: int
    store: str
    run_name: str | None
    on_error: OnError
    max_failures: int | None
    batch_timeout: float | None
    drop_last: bool
    launch: dict[str, Any] | None = field(default=None)

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> RunConfig:
        """The config of validated values with every unset one resolved (`validate`, then `_api`)."""
        names = {f.name for f in fields(cls)} - {"drop_last"}
        return cls(drop_last=bool(values["dataloader_kwargs"].get("drop_last", False)),
                   **{name: values[name] for name in names})

    def describe(self) -> dict[str, Any]:
        """JSON-friendly view for the store (dataloader kwargs as reprs)."""
        out = asdict(self)
        out["dataloader_kwargs"] = {k: repr(v) for k, v in self.dataloader_kwargs.items()}
        return out
