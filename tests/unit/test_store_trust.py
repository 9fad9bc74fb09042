"""Store trust in pieces: the secret file, signatures bound to run/kind/key, state blobs, records."""

from __future__ import annotations

import math
import pathlib
import pickle
import stat
import subprocess
import sys
from typing import Any

import duckdb
import numpy as np
import pytest
import torch

from nbbatch._errors import StoreError
from nbbatch._store import secret as store_secret
from nbbatch._store import trust
from nbbatch._store.connection import close_all
from nbbatch._store.records import Commit, ReducerStates, RunSpec
from nbbatch._store.writer import StoreWriter
from nbbatch._worker.state import dump_state, load_state

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(autouse=True)
def _own_data_dir(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    monkeypatch.delenv(store_secret.ENV_SECRET, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    return tmp_path / "data"


class Planted:
    """Unpickling this creates the marker file: a stand-in for any code a pickle can run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


# -- the secret -----------------------------------------------------------------------------------
def test_secret_is_created_once_private_and_stable(_own_data_dir: pathlib.Path) -> None:
    assert store_secret.load_secret(create=False) is None
    first = store_secret.load_secret()
    path = _own_data_dir / "nbbatch" / "secret"
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0
    assert first is not None and len(first) >= 32
    assert store_secret.load_secret() == first == store_secret.load_secret(create=False)
    assert [p.name for p in path.parent.iterdir()] == ["secret"], "no temporary file is left behind"


def test_concurrent_first_use_ends_with_one_secret() -> None:
    code = "from nbbatch._store.secret import load_secret; print(load_secret().decode())"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(4)]
    got = {p.communicate(timeout=50)[0].strip() for p in procs}
    assert [p.returncode for p in procs] == [0] * 4
    assert got == {store_secret.load_secret().decode()}


def test_environment_secret_wins_and_creates_no_file(monkeypatch: pytest.MonkeyPatch, _own_data_dir: pathlib.Path) -> None:
    monkeypatch.setenv(store_secret.ENV_SECRET, "cluster-wide-secret")
    assert store_secret.load_secret() == b"cluster-wide-secret"
    assert not (_own_data_dir / "nbbatch").exists()


def test_a_secret_others_can_read_is_refused(_own_data_dir: pathlib.Path) -> None:
    store_secret.load_secret()
    path = _own_data_dir / "nbbatch" / "secret"
    path.chmod(0o644)
    with pytest.raises(StoreError, match="not private to this user.*chmod 600"):
        store_secret.load_secret()


# -- signatures -----------------------------------------------------------------------------------
def test_signature_is_bound_to_run_kind_key_and_content() -> None:
    key = b"k" * 32
    sig = trust.sign(key, "run1", "reducer_state", "1:0", b"content")
    assert trust.verify(key, "run1", "reducer_state", "1:0", b"content", sig)
    assert not trust.verify(key, "run2", "reducer_state", "1:0", b"content", sig)
    assert not trust.verify(key, "run1", "launch", "1:0", b"content", sig)
    assert not trust.verify(key, "run1", "reducer_state", "1:1", b"content", sig)
    assert not trust.verify(key, "run1", "reducer_state", "1:0", b"content!", sig)
    assert not trust.verify(b"other" * 8, "run1", "reducer_state", "1:0", b"content", sig)
    assert not trust.verify(key, "run1", "reducer_state", "1:0", b"content", None)
    # field boundaries are length-prefixed: shifting bytes between fields changes the signature
    assert sig != trust.sign(key, "run1r", "educer_state", "1:0", b"content")


def test_launch_content_ignores_key_order_and_spacing() -> None:
    assert trust.launch_content({"b": 1, "a": [1, 2]}) == trust.launch_content({"a": [1, 2], "b": 1})


# -- reducer-state blobs --------------------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and a.requires_grad == b.requires_grad and torch.equal(
            a.detach(), b.detach())
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool((a == b).all())
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, float) and math.isnan(a):
        return math.isnan(b)
    return bool(a == b)


PLAIN = [
    None, True, 7, 2**70, 2.5, float("nan"), float("-inf"), "text",
    [1, (2, 3.5), [None]], (1,), {"a": 1, "b": [2]}, {1: "int key", (2, 3): "tuple key"}, {"$nbbatch": "a user key"},
    torch.tensor([1.5, -2.0]), torch.ones(2, 3, dtype=torch.bfloat16), torch.tensor(True), torch.zeros(0, 4),
    torch.arange(6).reshape(2, 3)[:, 1], torch.tensor([1 + 2j]), torch.tensor([1 + 2j]).conj(), torch.tensor([1.0, 2.0], requires_grad=True),
    np.arange(5, dtype=np.int32), np.zeros((2, 0)), np.float32(1.5), np.int64(-3), np.array([1 + 1j]),
    [(3, 0, [1, 2, 3])],  # a function reducer's (global_batch, seq, value) items
]


@pytest.mark.parametrize("value", PLAIN, ids=[type(v).__name__ + str(i) for i, v in enumerate(PLAIN)])
def test_plain_states_are_json_and_round_trip_exactly(value: Any) -> None:
    blob = dump_state(value)
    assert blob[:1] == b"J"
    assert _same(load_state(blob), value)


def test_other_states_are_pickled() -> None:
    values: list[Any] = [{1, 2}, np.array(["a"], dtype=object), torch.nn.Parameter(torch.ones(1)), [1, {2}]]
    blobs = [dump_state(v) for v in values]
    assert [b[:1] for b in blobs] == [b"P"] * len(values)
    back = [load_state(b) for b in blobs]
    assert back[0] == {1, 2} and back[1].tolist() == ["a"] and back[3] == [1, {2}]
    assert type(back[2]) is torch.nn.Parameter and torch.equal(back[2].detach(), torch.ones(1))


def test_states_container_is_never_a_pickle(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "marker"
    states = (dump_state([1, 2]), b"P" + pickle.dumps(Planted(marker)))
    blob = trust.encode_states(states)
    assert trust.decode_states(blob) == states
    assert not marker.exists()
    # a container in the format before signing is read with no globals at all: a planted one fails
    with pytest.raises(StoreError, match="unreadable"):
        trust.decode_states(pickle.dumps((b"x", Planted(marker))))
    assert not marker.exists()
    assert trust.decode_states(pickle.dumps((b"a", b"b"))) == (b"a", b"b")


# -- records in a store ---------------------------------------------------------------------------
def _spec(name: str, launch: dict[str, Any] | None = None, trust_: bool = False) -> RunSpec:
    return RunSpec(
        name=name, processor="m.P", dataset_len=10, batch_size=2, max_batches=None, checkpoint_interval=1,
        world_size=1, planned_batches=5, real_batches=5, on_error="raise", max_failures=None,
        output_root="/tmp/nbbatch-unit-outputs", launch=launch, config={}, trust=trust_,
    )


def _failed_run(store: str, name: str, launch: dict[str, Any] | None = None) -> str:
    writer = StoreWriter(store)
    try:
        record = writer.begin(_spec(name, launch))
        commit = Commit()
        commit.reducer_states = {0: ReducerStates(1, (dump_state([1, 2]),))}
        writer.commit(record, commit)
        writer.finish(record, "failed", None, "boom")
        return record.run_id
    finally:
        writer.close()


def _resume(store: str, name: str, trust_: bool = False) -> Any:
    writer = StoreWriter(store)
    try:
        return writer.begin(_spec(name, trust_=trust_))
    finally:
        writer.close()


def test_own_records_verify_and_resume(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "s.duckdb")
    run_id = _failed_run(store, "mine", {"target": "m:P", "dataset": "m:d", "dataset_args": {}, "cwd": "/"})
    with duckdb.connect(store, read_only=True) as con:
        records = trust.read_records(con, run_id)
    assert [r.kind for r in records] == ["launch", "reducer_state"]
    assert not trust.untrusted(records, run_id, store_secret.load_secret())
    record = _resume(store, "mine")
    assert record.reducer_states == ((1, 0, (dump_state([1, 2]),)),)


def test_a_signature_moved_to_another_run_is_refused(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "s.duckdb")
    a = _failed_run(store, "a")
    b = _failed_run(store, "b")
    close_all(store)
    with duckdb.connect(store) as con:
        blob, step = con.execute("SELECT states, step FROM reducer_state WHERE run_id = ?", [a]).fetchone()
        sig, kid = con.execute("SELECT signature, key_id FROM signatures WHERE run_id = ?", [a]).fetchone()
        con.execute("UPDATE reducer_state SET states = ?, step = ? WHERE run_id = ?", [blob, step, b])
        con.execute("UPDATE signatures SET signature = ?, key_id = ? WHERE run_id = ?", [sig, kid, b])
    with pytest.raises(StoreError, match="trust") as info:
        _resume(store, "b")
    assert "signature does not match its content" in str(info.value)
    assert "nbbatch trust b" in str(info.value) and "nbbatch show b" in str(info.value)


def test_records_of_a_store_without_the_signatures_table_are_unsigned(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "s.duckdb")
    run_id = _failed_run(store, "old")
    close_all(store)
    with duckdb.connect(store) as con:
        con.execute("DROP TABLE signatures")
    with duckdb.connect(store, read_only=True) as con:
        records = trust.read_records(con, run_id)
    assert [r.verdict(run_id, store_secret.load_secret()) for r in records] == ["unsigned"]
    with pytest.raises(StoreError, match="unsigned.*does not trust them"):
        _resume(store, "old")
    assert _resume(store, "old", trust_=True).reducer_states == ((1, 0, (dump_state([1, 2]),)),)
    assert _resume(store, "old").attempt == 3, "signed by the trusting resume, so no trust step again"
