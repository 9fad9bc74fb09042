"""Trust in a store's records that lead to code, after Jupyter's notebook trust.

A resume runs code named by the store: the launch info (``runs.launch``: the processor TARGET,
the dataset FACTORY, its arguments and the folder they import from) and the reducer states
(``reducer_state``; the pickled ones are unpickled in a worker). A store on a shared file system,
or one copied from someone else, may hold planted records, so every such record is signed with
HMAC-SHA256 under a per-user secret kept outside the store, bound to the run id, the record kind,
the record key and the content (a signature cannot be moved to another run or record). A resume
accepts only records this user signed; ``nbbatch trust RUN`` or ``trust=True`` re-signs them
after the user has seen what would run.

The key comes from ``_store/secret.py`` (``$NBBATCH_SECRET``, else a 0600 file in the user's data
folder). Reading records never unpickles anything; the pickled reducer states are unpickled only
in a worker of a resume that verified them.
Must not import anything from nbbatch but ``_errors`` and ``_store``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import io
import json
import logging
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import duckdb

from nbbatch._errors import StoreError
from nbbatch._store.connection import StoreOpenError, ensure_schema, open_store
from nbbatch._store.records import ReducerStates
from nbbatch._store.schema import REDUCER_STATE, SIGNATURES, insert_sql
from nbbatch._store.secret import ENV_SECRET, key_id, load_secret

__all__ = [
    "Record",
    "Signer",
    "decode_states",
    "encode_states",
    "launch_content",
    "put_signature",
    "read_records",
    "refusal",
    "sign",
    "sign_records",
    "sign_run",
    "state_record",
    "untrusted",
    "verify",
]

logger = logging.getLogger("nbbatch")

Kind = Literal["launch", "reducer_state"]
Verdict = Literal["signed", "unsigned", "foreign"]

_DOMAIN = b"nbbatch-trust-v1"
_STATES_MAGIC = b"nbbatch-states:1\n"
_SHOWN_RECORDS = 4  # a refusal names this many untrusted records, then counts the rest


# -- signatures ---------------------------------------------------------------------------------
def _message(run_id: str, kind: str, key: str, content: bytes) -> bytes:
    parts = [_DOMAIN, run_id.encode(), kind.encode(), key.encode(), content]
    return b"".join(struct.pack(">Q", len(p)) + p for p in parts)


def sign(secret: bytes, run_id: str, kind: str, key: str, content: bytes) -> str:
    """The hex HMAC-SHA256 of one record, bound to its run, kind and key."""
    return hmac.new(secret, _message(run_id, kind, key, content), hashlib.sha256).hexdigest()


def verify(secret: bytes, run_id: str, kind: str, key: str, content: bytes, signature: str | None) -> bool:
    """Whether ``signature`` is this secret's signature of the record."""
    if not signature:
        return False
    return hmac.compare_digest(sign(secret, run_id, kind, key, content), signature)


def launch_content(launch: Any) -> bytes:
    """The signed bytes of launch info: canonical JSON, so key order and spacing do not matter."""
    return json.dumps(launch, sort_keys=True, separators=(",", ":")).encode()


def state_record(attempt: int, rank: int, step: int | None, blob: bytes) -> tuple[str, bytes]:
    """The key and signed bytes of one ``reducer_state`` row."""
    return f"{attempt}:{rank}", f"{step}".encode() + b"\0" + blob


# -- reducer-state containers ---------------------------------------------------------------------
def encode_states(states: tuple[bytes, ...]) -> bytes:
    """The ``reducer_state.states`` blob: a JSON list of the per-reducer blobs (never a pickle)."""
    return _STATES_MAGIC + json.dumps([base64.b64encode(s).decode() for s in states]).encode()


class _NoGlobals(pickle.Unpickler):
    """Loads the tuple-of-bytes container of stores written before signing; it can build no object."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"{module}.{name} is not allowed in a reducer-state container")


def decode_states(blob: bytes) -> tuple[bytes, ...]:
    """The per-reducer blobs of a ``reducer_state.states`` value (new or pre-signing format).

    Raises:
        StoreError: the value is neither format.
    """
    try:
        if blob.startswith(_STATES_MAGIC):
            items = json.loads(blob[len(_STATES_MAGIC):])
            return tuple(base64.b64decode(s, validate=True) for s in items)
        value = _NoGlobals(io.BytesIO(blob)).load()
        if isinstance(value, tuple) and all(isinstance(s, bytes) for s in value):
            return value
    except Exception as exc:  # json, base64 and pickle errors alike: the container is not ours
        raise StoreError(f"a stored reducer state is unreadable ({type(exc).__name__}: {exc})") from exc
    raise StoreError("a stored reducer state is not a tuple of per-reducer values")


def _state_formats(blob: bytes) -> str:
    """How the states of one row are stored, told without loading them (for display)."""
    if not blob.startswith(_STATES_MAGIC):
        return "pickled (written before signing)"
    try:
        states = decode_states(blob)
    except StoreError:
        return "unreadable"
    kinds = ["plain data" if s[:1] == b"J" else "pickled" for s in states]
    return ", ".join(kinds) if kinds else "no reducers"


# -- records of a run ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Record:
    """One stored record that leads to code, with its signature as stored."""

    kind: Kind
    key: str
    content: bytes
    signature: str | None
    signed_key_id: str | None
    value: Any
    """The launch dict, or a description of a reducer-state row's formats."""
    data: bytes = b""
    """A reducer-state row's ``states`` blob, as read."""

    def verdict(self, run_id: str, secret: bytes | None) -> Verdict:
        """``signed`` by this secret, ``unsigned``, or ``foreign`` (another key, or changed since)."""
        if self.signature is None:
            return "unsigned"
        ok = secret is not None and verify(secret, run_id, self.kind, self.key, self.content, self.signature)
        return "signed" if ok else "foreign"

    def describe(self) -> str:
        """One line for people: what the record is."""
        if self.kind == "launch":
            return "launch info"
        attempt, rank = self.key.split(":")
        return f"reducer state of attempt {attempt}, rank {rank} ({self.value})"


def _has_signatures(con: duckdb.DuckDBPyConnection) -> bool:
    found = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_name = 'signatures'").fetchall()
    return bool(found[0][0])


def read_records(con: duckdb.DuckDBPyConnection, run_id: str) -> list[Record]:
    """The run's launch info and reducer states with their stored signatures; loads no pickle."""
    sigs: dict[tuple[str, str], tuple[str, str | None]] = {}
    if _has_signatures(con):
        for kind, key, signature, kid in con.execute(
            "SELECT kind, key, signature, key_id FROM signatures WHERE run_id = ?", [run_id]
        ).fetchall():
            sigs[(kind, key)] = (signature, kid)
    out: list[Record] = []
    launch_rows = con.execute("SELECT launch FROM runs WHERE run_id = ?", [run_id]).fetchall()
    if launch_rows and launch_rows[0][0] is not None:
        text = launch_rows[0][0]
        try:
            launch = json.loads(text)
            content = launch_content(launch)
        except ValueError:
            launch, content = text, str(text).encode()
        sig, kid = sigs.get(("launch", ""), (None, None))
        out.append(Record("launch", "", content, sig, kid, launch))
    for attempt, rank, step, blob in con.execute(
        "SELECT attempt, rank, step, states FROM reducer_state WHERE run_id = ? ORDER BY attempt, rank", [run_id]
    ).fetchall():
        blob = bytes(blob or b"")
        key, content = state_record(int(attempt), int(rank), None if step is None else int(step), blob)
        sig, kid = sigs.get(("reducer_state", key), (None, None))
        out.append(Record("reducer_state", key, content, sig, kid, _state_formats(blob), blob))
    return out


def untrusted(records: list[Record], run_id: str, secret: bytes | None) -> list[tuple[Record, Verdict]]:
    """The records this secret did not sign, with why."""
    out: list[tuple[Record, Verdict]] = []
    for record in records:
        verdict = record.verdict(run_id, secret)
        if verdict != "signed":
            out.append((record, verdict))
    return out


def sign_records(con: duckdb.DuckDBPyConnection, run_id: str, records: list[Record], secret: bytes) -> None:
    """Store this secret's signature of each record (as read, so what was shown is what is signed)."""
    kid = key_id(secret)
    for record in records:
        put_signature(con, run_id, record.kind, record.key, sign(secret, run_id, record.kind, record.key, record.content), kid)


def put_signature(con: duckdb.DuckDBPyConnection, run_id: str, kind: str, key: str, signature: str, kid: str) -> None:
    """Upsert one signature row."""
    con.execute(insert_sql(SIGNATURES, replace=True), [run_id, kind, key, signature, kid])


def sign_run(path: str, run_id: str, show: Callable[[list[Record]], None]) -> list[Record]:
    """Re-sign every record of a run with this user's key, after ``show`` has displayed them.

    Records are read and signed on one connection, so what ``show`` saw is what gets signed.
    """
    secret = load_secret()
    assert secret is not None  # load_secret(create=True) returns a secret or raises
    try:
        with open_store(path, write=True) as con:
            ensure_schema(con)
            records = read_records(con, run_id)
            show(records)
            con.execute("BEGIN TRANSACTION")
            sign_records(con, run_id, records, secret)
            con.execute("COMMIT")
    except StoreOpenError as exc:
        raise StoreError(str(exc)) from exc
    except duckdb.Error as exc:
        raise StoreError(f"signing run {run_id} in `{path}` failed ({str(exc).splitlines()[0]})") from exc
    return records


class Signer:
    """The writer's side: this user's key, loaded on first use, signing what the run writes.

    Without a usable key (no writable data folder, a secret file readable by others) the run
    still goes, its records unsigned, and a warning says a resume will need a trust step.
    """

    def __init__(self) -> None:
        self._secret: bytes | None = None
        self._loaded = False
        self.problem: str | None = None

    @property
    def secret(self) -> bytes | None:
        """The key, or None (``problem`` says why)."""
        if not self._loaded:
            self._loaded = True
            try:
                self._secret = load_secret()
            except StoreError as exc:
                self.problem = str(exc)
                logger.warning("nbbatch: records of this run are not signed (%s); a resume will need "
                               "`nbbatch trust RUN` or `trust=True`", exc)
        return self._secret

    def _put(self, con: duckdb.DuckDBPyConnection, run_id: str, kind: str, key: str, content: bytes) -> None:
        secret = self.secret
        if secret is not None:
            put_signature(con, run_id, kind, key, sign(secret, run_id, kind, key, content), key_id(secret))

    def sign_launch(self, con: duckdb.DuckDBPyConnection, run_id: str, launch: dict[str, Any] | None) -> None:
        """Sign the launch info just written to the run row (None: nothing to sign)."""
        if launch:
            self._put(con, run_id, "launch", "", launch_content(json.loads(json.dumps(launch))))

    def put_states(
        self, con: duckdb.DuckDBPyConnection, run_id: str, attempt: int, rank: int, reduced: ReducerStates
    ) -> None:
        """Write one rank's reducer states (as JSON, never a pickle container) with their signature."""
        blob = encode_states(reduced.states)
        con.execute(insert_sql(REDUCER_STATE, replace=True), [run_id, attempt, rank, reduced.step, blob])
        self._put(con, run_id, "reducer_state", *state_record(attempt, rank, reduced.step, blob))

    def resume_states(
        self, con: duckdb.DuckDBPyConnection, run_id: str, name: str, store: str, trust: bool
    ) -> tuple[tuple[int, int, tuple[bytes, ...]], ...]:
        """Check (or, with ``trust``, re-sign) every record of the run, then return its reducer states.

        Raises:
            StoreError: a record is unsigned or signed by another key, and ``trust`` is False.
        """
        records = read_records(con, run_id)
        secret = self.secret
        if trust:
            if secret is not None:
                sign_records(con, run_id, records, secret)
        else:
            bad = untrusted(records, run_id, secret)
            if bad:
                raise StoreError(refusal(name, store, bad, secret, self.problem))
        return tuple(
            (int(r.key.split(":")[0]), int(r.key.split(":")[1]), decode_states(r.data))
            for r in records if r.kind == "reducer_state"
        )


def refusal(
    name: str, store: str, bad: list[tuple[Record, Verdict]], secret: bytes | None, problem: str | None = None
) -> str:
    """The StoreError text of a resume that meets records this user did not sign: what, why, the fix."""
    parts = []
    for record, verdict in bad[:_SHOWN_RECORDS]:
        if verdict == "unsigned":
            why = "unsigned"
        elif record.signed_key_id and secret is not None and record.signed_key_id != key_id(secret):
            why = f"signed with another key, id {record.signed_key_id}"
        else:
            why = "its signature does not match its content"
        parts.append(f"{record.describe()}: {why}")
    if len(bad) > _SHOWN_RECORDS:
        parts.append(f"and {len(bad) - _SHOWN_RECORDS} more")
    mine = f"this user's key id is {key_id(secret)}" if secret is not None else f"no signing key: {problem or ENV_SECRET}"
    return (
        f"run {name!r} in `{store}` holds records this user did not sign ({'; '.join(parts)}; {mine}), so nbbatch "
        f"does not trust them: resuming would run the code they name. Check what would run with "
        f"`nbbatch show {name} --store {store}`, then trust the run with `nbbatch trust {name} --store {store}` "
        f"(or pass `trust=True` to `torch_batch_process`, `--trust` to `nbbatch resume`). A cluster whose ranks "
        f"do not share a home directory sets the same `{ENV_SECRET}` on every machine"
    )
