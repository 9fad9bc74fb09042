"""The run options defined once (issue 10): the table in `_options` against the API, the CLI and the magic.

The API's messages are pinned word for word here (Determined's where Determined checks); the
front ends are checked to offer exactly the table's flags, with its help texts and limits.
"""

from __future__ import annotations

import inspect
import math
import pathlib
import typing
from dataclasses import fields

import pytest
from click.testing import CliRunner
from IPython.core.error import UsageError
from IPython.core.magic_arguments import parse_argstring

from nbbatch._errors import InvalidArgument, InvalidRunName
from nbbatch._options import (
    OPTIONS,
    OnError,
    RunConfig,
    check_run_name,
    flagged,
    option,
    stored_values,
    validate,
)

pytestmark = pytest.mark.timeout(60)


def test_torch_batch_process_takes_every_option_with_the_tables_default() -> None:
    from nbbatch._api import torch_batch_process

    parameters = inspect.signature(torch_batch_process).parameters
    for o in OPTIONS:
        assert o.name in parameters, f"`{o.name}` is in the table but not a keyword of torch_batch_process"
        assert parameters[o.name].default == o.default, o.name
    others = set(parameters) - {o.name for o in OPTIONS}
    assert others == {"batch_processor_cls", "dataset", "distributed_context", "progress"}


def test_run_config_carries_every_option_but_trust() -> None:
    assert {f.name for f in fields(RunConfig)} == {o.name for o in OPTIONS} - {"trust"} | {"drop_last"}
    assert option("on_error").choices == typing.get_args(OnError)


def test_the_api_reexports_the_one_run_config() -> None:
    from nbbatch import _api

    assert _api.RunConfig is RunConfig


@pytest.mark.parametrize(
    "name,value,message",
    [
        ("batch_size", "8", "`batch_size` must be an integer, got '8'"),
        ("batch_size", True, "`batch_size` must be an integer, got True"),
        ("batch_size", 0, "`batch_size` must be >= 1, got 0"),
        ("num_processes", 0, "`num_processes` must be >= 1, got 0"),
        ("max_failures", -1, "`max_failures` must be >= 0, got -1"),
        ("max_batches", 1.5, "`max_batches` must be an integer or None, got 1.5"),
        ("checkpoint_interval", 0, "checkpoint_interval should be a positive integer"),
        ("checkpoint_interval", None, "checkpoint_interval should be a positive integer"),
        ("checkpoint_interval", True, "checkpoint_interval should be a positive integer"),
        ("on_error", "ignore", "`on_error` must be \"raise\" or \"skip\", got 'ignore'"),
        ("batch_timeout", math.nan, "`batch_timeout` must be a finite positive number of seconds, or None for no "
                                    "limit; got nan"),
        ("batch_timeout", math.inf, "`batch_timeout` must be a finite positive number of seconds, or None for no "
                                    "limit; got inf"),
        ("batch_timeout", 0, "`batch_timeout` must be a finite positive number of seconds, or None for no limit; got 0"),
        ("trust", "yes", "`trust` must be True or False, got 'yes'"),
        ("trust", None, "`trust` must be True or False, got None"),
    ],
)
def test_each_option_keeps_its_message(name: str, value: object, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        validate({name: value})
    assert str(info.value) == message


def test_unset_options_stay_unset_and_defaults_apply() -> None:
    values = validate({})
    assert values["checkpoint_interval"] == 5 and values["on_error"] == "raise" and values["trust"] is False
    assert all(values[o.name] is None for o in OPTIONS if o.default is None)


def test_run_names_and_store_paths(tmp_path: pathlib.Path) -> None:
    with pytest.raises(InvalidRunName, match=r"^a run name must be letters, digits and `\._-`"):
        validate({"run_name": "../x"})
    assert check_run_name("nightly-2024.01_a") == "nightly-2024.01_a"
    with pytest.raises(InvalidArgument) as info:
        validate({"store": tmp_path})
    assert str(info.value) == f"`store` must be a file path such as `{tmp_path / 'nbbatch.duckdb'}`, not a folder"
    assert validate({"store": tmp_path / "s.duckdb"})["store"] == str(tmp_path / "s.duckdb")


def test_dataloader_kwargs_are_copied() -> None:
    given = {"batch_size": 4}
    copied = validate({"dataloader_kwargs": given})["dataloader_kwargs"]
    copied.pop("batch_size")
    assert given == {"batch_size": 4}


def test_minimums_are_the_apis() -> None:
    for o in OPTIONS:
        if o.minimum is not None:
            assert validate({o.name: o.minimum})[o.name] == o.minimum
            with pytest.raises(InvalidArgument):
                validate({o.name: o.minimum - 1})


def test_resume_reads_back_the_stored_options() -> None:
    row = {"batch_size": 4, "max_batches": None, "checkpoint_interval": 2, "on_error": None, "max_failures": 3,
           "name": "r", "world_size": 2}
    assert stored_values(row) == {"batch_size": 4, "max_batches": None, "checkpoint_interval": 2, "on_error": "raise",
                                  "max_failures": 3}


@pytest.mark.parametrize("command,place", [("run", "run"), ("resume", "resume")])
def test_cli_commands_offer_the_tables_flags(command: str, place: typing.Literal["run", "resume"]) -> None:
    from nbbatch._ui.cli import cli

    params = {p.name: p for p in cli.commands[command].params}
    for o in flagged(place):
        assert o.name in params, o.name
        assert params[o.name].opts[0] == o.flag and getattr(params[o.name], "help", None) == o.help  # type: ignore[attr-defined]
    assert not {o.name for o in OPTIONS if place not in o.places} & set(params)


@pytest.mark.parametrize(
    "args,text",
    [
        (["--name", "../x"], "Invalid value for '--name': a run name must be letters, digits"),
        (["--batch-size", "0"], "Invalid value for '--batch-size'"),
        (["--max-failures", "-1"], "Invalid value for '--max-failures'"),
        (["--on-error", "ignore"], "Invalid value for '--on-error'"),
    ],
)
def test_cli_refuses_bad_values_while_parsing(tmp_path: pathlib.Path, args: list[str], text: str) -> None:
    from nbbatch._ui.cli import cli

    result = CliRunner().invoke(cli, ["run", "no_such_module:Thing", "--dataset", "x:y", *args])
    assert result.exit_code == 2 and text in result.output, result.output
    assert "no_such_module" not in result.output, "refused before the target was imported"


def test_cli_refuses_a_store_folder_while_parsing(tmp_path: pathlib.Path) -> None:
    from nbbatch._ui.cli import cli

    result = CliRunner().invoke(cli, ["run", "no_such_module:Thing", "--dataset", "x:y", "--store", str(tmp_path)])
    assert result.exit_code == 2 and "Invalid value for '--store': `store` must be a file path" in result.output


def test_magic_offers_the_tables_flags() -> None:
    from nbbatch._ui.magic import BatchMagics

    parser = BatchMagics.batchprocess.parser  # type: ignore[attr-defined]
    actions = {a.dest: a for a in parser._actions}
    for o in flagged("magic"):
        assert actions[o.name].option_strings == [o.flag] and actions[o.name].help.startswith(o.help), o.name
    args = parse_argstring(BatchMagics.batchprocess, "P d")
    assert {o.name: getattr(args, o.name) for o in flagged("magic")} == {o.name: o.flag_default for o in flagged("magic")}


@pytest.mark.parametrize(
    "line,text",
    [
        ("--batch-size 0", "--batch-size must be at least 1, got 0"),
        ("--max-failures -1", "--max-failures must be at least 0, got -1"),
        ("--name ../x", "--name: a run name must be letters"),
    ],
)
def test_magic_checks_values_by_the_table(line: str, text: str) -> None:
    from nbbatch._ui.magic import BatchMagics, _run_options

    with pytest.raises(UsageError, match=text):
        _run_options(parse_argstring(BatchMagics.batchprocess, f"P d {line}"))
