"""The CLI's side of store trust: what a resume would run, which records this user signed, ``nbbatch trust``.

``nbbatch show`` prints `show_lines`; ``nbbatch resume`` calls `require` before it imports anything
the store names; ``nbbatch trust RUN`` shows the records and re-signs them with this user's key
(``_store/trust.py`` holds the signatures). Must not import ``_launch``, ``_worker`` or
``_store.writer``.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import click

from nbbatch._errors import StoreError
from nbbatch._options import OPTION_HELP
from nbbatch._store.secret import key_id, load_secret
from nbbatch._ui import targets

if TYPE_CHECKING:
    from nbbatch._store.trust import Record

__all__ = ["launch_lines", "require", "show_json", "show_lines", "trust_command"]

Lines = list[tuple[str, str]]

_VERDICTS = {"signed": "signed by you", "unsigned": "UNSIGNED", "foreign": "NOT signed by you"}


def launch_lines(launch: Any) -> Lines:
    """What a resume imports and calls: TARGET, FACTORY with its arguments, the folder it imports from."""
    if not isinstance(launch, dict):
        return [("launch", json.dumps(launch, default=str))] if launch else []
    args = launch.get("dataset_args") or {}
    shown = ", ".join(f"{k}={json.dumps(v)}" for k, v in args.items()) if isinstance(args, dict) else repr(args)
    lines = [("target", str(launch.get("target")))]
    if launch.get("dataset") is not None or args:
        lines.append(("dataset", f"{launch.get('dataset')}({shown})"))
    known = {"target", "dataset", "dataset_args", "cwd"}
    lines += [(f"launch {k}", json.dumps(v, default=str)) for k, v in launch.items() if k not in known]
    return lines + [("cwd", str(launch.get("cwd")))]


def _records(path: str, run_id: str) -> list[Record]:
    from nbbatch._store import reader, trust  # duckdb loads only for commands that read a store

    with reader.reading(path) as con:
        return trust.read_records(con, run_id)


def _secret(create: bool) -> tuple[bytes | None, str | None]:
    try:
        return load_secret(create=create), None
    except StoreError as exc:
        return None, str(exc)


def _record_lines(records: list[Record], run_id: str, secret: bytes | None) -> Lines:
    lines: Lines = []
    for record in records:
        verdict = record.verdict(run_id, secret)
        signer = f" (key id {record.signed_key_id})" if verdict == "foreign" and record.signed_key_id else ""
        lines.append(("", f"{record.describe()}: {_VERDICTS[verdict]}{signer}"))
    return lines


def show_lines(path: str, summary: dict[str, Any]) -> Lines:
    """``nbbatch show``'s launch and trust lines; reads no pickle and creates no secret."""
    from nbbatch._store import trust as store_trust

    records = _records(path, str(summary["run_id"]))
    secret, problem = _secret(create=False)
    lines = launch_lines(summary.get("launch"))
    bad = store_trust.untrusted(records, str(summary["run_id"]), secret)
    mine = f"your key id {key_id(secret)}" if secret is not None else (problem or "you have no signing key yet")
    if not records:
        verdict = "nothing to sign (no launch info, no reducer states)"
    elif bad:
        verdict = (f"NOT TRUSTED: {len(bad)} of {len(records)} records not signed by you ({mine}); after checking "
                   f"what they run, `nbbatch trust {summary['name']} --store {path}`")
    else:
        verdict = f"trusted: all {len(records)} records signed by you ({mine})"
    return lines + [("trust", verdict)] + _record_lines(records, str(summary["run_id"]), secret)


def show_json(path: str, summary: dict[str, Any]) -> dict[str, Any]:
    """The trust part of ``nbbatch show --json``."""
    from nbbatch._store import trust as store_trust

    run_id = str(summary["run_id"])
    records = _records(path, run_id)
    secret, _ = _secret(create=False)
    return {
        "trusted": not store_trust.untrusted(records, run_id, secret),
        "key_id": key_id(secret) if secret is not None else None,
        "records": [{"kind": r.kind, "key": r.key, "what": r.describe(), "verdict": r.verdict(run_id, secret),
                     "signed_key_id": r.signed_key_id} for r in records],
    }


def require(path: str, summary: dict[str, Any], trust: bool) -> dict[str, Any]:
    """Before ``nbbatch resume`` imports what the store names: refuse records this user did not sign.

    With ``trust`` it only says what it trusts (the run signs the records when it starts).
    Returns the launch info as checked, which is what the resume must import (not an earlier read).

    Raises:
        click.ClickException: a record is unsigned or foreign-signed (exit 1), or no key can be made.
    """
    from nbbatch._store import trust as store_trust

    run_id, name = str(summary["run_id"]), str(summary["name"])
    records = _records(path, run_id)
    secret, problem = _secret(create=True)
    bad = store_trust.untrusted(records, run_id, secret)
    refused = store_trust.refusal(name, path, bad, secret, problem) if bad and not trust else None
    refused = _agree(refused)  # under torchrun every rank checks with its own key; one refusal stops all
    if refused is not None:
        raise click.ClickException(refused)
    launch = next((r.value for r in records if r.kind == "launch"), None)
    if not isinstance(launch, dict):
        raise click.ClickException(f"the launch info of run {name!r} changed while it was read; run the command again")
    if bad:
        click.echo(f"nbbatch: --trust: signing and running run {name!r}'s records:", err=True)
        for key, value in launch_lines(launch) + _record_lines(records, run_id, secret):
            click.echo(f"  {key + ': ' if key else ''}{value}", err=True)
    return launch


#: Longest a torchrun rank waits for every rank's trust verdict before refusing.
AGREE_TIMEOUT_SECONDS = 300.0
_stores: list[Any] = []  # a TCPStore this process hosts must outlive the check (torch's own group reuses it)


def _agree(refused: str | None) -> str | None:
    """Under torchrun, share each rank's verdict before any rank imports what the store names.

    A rank that refused alone and exited would leave the others waiting in the process group's
    rendezvous for its 30 minute timeout; here every rank refuses with the first refusal instead.
    Uses torchrun's own key-value store (``MASTER_ADDR:MASTER_PORT``), as ``init_process_group`` will.
    """
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1 or "MASTER_ADDR" not in env or "MASTER_PORT" not in env or "TORCHELASTIC_RUN_ID" not in env:
        return refused
    import datetime

    from torch.distributed import TCPStore  # type: ignore[attr-defined]

    rank = int(env.get("RANK", "0"))
    hosts = env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" and rank == 0  # else the agent hosts it
    timeout = datetime.timedelta(seconds=AGREE_TIMEOUT_SECONDS)
    store = TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world, is_master=hosts, timeout=timeout,
                          multi_tenant=True, wait_for_workers=False)
    _stores.append(store)
    prefix = f"nbbatch/trust/{env['TORCHELASTIC_RUN_ID']}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
    store.set(prefix + str(rank), refused or "")
    keys = [prefix + str(r) for r in range(world)]
    try:
        store.wait(keys, timeout)
    except Exception as exc:  # a rank that failed before its check (say, no store on its machine)
        return f"not every torchrun rank reached the trust check within {AGREE_TIMEOUT_SECONDS:.0f} s ({exc})"
    for r, key in enumerate(keys):
        text = bytes(store.get(key)).decode()
        if text:
            return text if r == rank else f"torchrun rank {r} refused to resume: {text}"
    return None


@click.command("trust")
@click.argument("run")
@click.option("--store", "store", default=None, help=OPTION_HELP["store"])
def trust_command(run: str, store: str | None) -> int:
    """Trust the run RUN: sign its launch info and reducer states with your key, so a resume runs them.

    A resume imports and calls what the store names (TARGET, dataset FACTORY and its arguments)
    and unpickles its reducer states, so it refuses records you did not sign (a store copied from
    someone else, or on a shared file system). Check them first with `nbbatch show RUN`; this
    command prints what it signs. Your key is $NBBATCH_SECRET, else ~/.local/share/nbbatch/secret.
    """
    from nbbatch._store import trust as store_trust

    path = targets.existing_store(store)
    summary = targets.run_summary(path, run)

    def show(records: list[Record]) -> None:
        launch = next((r.value for r in records if r.kind == "launch"), None)
        click.echo(f"signing {len(records)} records of run {summary['name']!r} ({summary['run_id']}) in {path}:")
        for key, value in launch_lines(launch) + _record_lines(records, str(summary["run_id"]), secret):
            click.echo(f"  {key + ': ' if key else ''}{value}")

    try:
        secret = load_secret()
        records = store_trust.sign_run(path, str(summary["run_id"]), show)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if not records:
        click.echo("(nothing to sign: the run has no launch info and no reducer states)")
    click.echo(f"run {summary['name']!r} is trusted by key id {key_id(secret) if secret else '?'}; "
               f"`nbbatch resume {summary['name']} --store {path}` runs it")
    return 0
