"""A store is code: resumes run only records this user signed; reading never runs anything.

Hostile stores are built the way an attacker would: a launch row naming `subprocess:run` with
`shell=True`, a TARGET file that acts on import, pickles that act when loaded. Each writes a marker
file if it ever runs; the tests assert the markers never appear, through every entry point.
"""

from __future__ import annotations

import json
import os
import pathlib
import pickle
import subprocess
import sys
from typing import Any

import duckdb
import pytest
import torch
from helpers import free_port, nbbatch_cli, run_summary

import nbbatch
from nbbatch import MetricReducer, TorchBatchProcessor, torch_batch_process
from nbbatch._errors import StoreError
from nbbatch._store import reader, trust
from nbbatch._store.connection import close_all
from nbbatch._store.secret import ENV_SECRET
from nbbatch._store.writer import StoreWriter
from nbbatch._ui.dashboard import control
from nbbatch._worker.state import load_state

SCRIPTS = pathlib.Path(__file__).resolve().parent / "scripts"
PROCS = SCRIPTS / "procs.py"

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(autouse=True)
def _own_secret(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """This test's user: a data folder of its own (its secret), inherited by every subprocess."""
    monkeypatch.delenv(ENV_SECRET, raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    monkeypatch.delenv("NBBATCH_TEST_FAIL_AT", raising=False)


def failed_cli_run(tmp_path: pathlib.Path, name: str, env: dict[str, str] | None = None) -> pathlib.Path:
    """`nbbatch run` of procs.Failing over 30 numbers: fails at sample 10 after committing batches."""
    store = tmp_path / "s.duckdb"
    ran = nbbatch_cli("run", f"{PROCS}:Failing", "--dataset", f"{PROCS}:numbers", "--dataset-arg", "n=30",
                      "--batch-size", "2", "--checkpoint-interval", "2", "--name", name, "--store", str(store),
                      "--no-progress", cwd=tmp_path, env=env)
    assert ran.returncode == 1, ran.stderr
    return store


class Planted:
    """Unpickling this creates the marker file: a stand-in for any code a pickle can run."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.marker), "w"))


# -- a processor with plain and pickled reducer states --------------------------------------------
class Distinct(MetricReducer):
    """State is a set: not plain data, so it is pickled (and signed)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seen: set[int] = set()

    def update(self, values: list[int]) -> None:
        self.seen.update(values)

    def per_slot_reduce(self) -> set[int]:
        return self.seen

    def cross_slot_reduce(self, per_slot_metrics: list[set[int]]) -> int:
        return len(set().union(*per_slot_metrics))


class TensorSum(MetricReducer):
    """State is a (tensor, count) tuple: plain data, stored as JSON and rebuilt with its dtype."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sum, self.count = torch.zeros(2, dtype=torch.float64), 0

    def update(self, batch: torch.Tensor) -> None:
        self.sum += torch.stack([batch.double(), batch.double() ** 2]).sum(dim=1)
        self.count += len(batch)

    def per_slot_reduce(self) -> tuple[torch.Tensor, int]:
        return self.sum, self.count

    def cross_slot_reduce(self, per_slot_metrics: list[tuple[torch.Tensor, int]]) -> list[float]:
        assert all(isinstance(s, tuple) and s[0].dtype == torch.float64 for s in per_slot_metrics)
        return torch.stack([s for s, _ in per_slot_metrics]).sum(dim=0).tolist() + [sum(c for _, c in per_slot_metrics)]


class Flaky(torch.utils.data.Dataset):  # type: ignore[type-arg]
    """The numbers 0..n-1; reading ``fail_at`` raises while the file ``switch`` exists."""

    def __init__(self, n: int, fail_at: int, switch: pathlib.Path) -> None:
        self.n, self.fail_at, self.switch = n, fail_at, switch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        if i == self.fail_at and self.switch.exists():
            raise ValueError(f"sample {i} is broken")
        return i


class Mixed(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")
        self.distinct = context.wrap_reducer(Distinct(), name="distinct")
        self.moments = context.wrap_reducer(TensorSum(), name="moments")

    def process_batch(self, batch: torch.Tensor, batch_idx: int) -> dict[str, torch.Tensor]:
        self.total.update(int(batch.sum()))
        self.distinct.update(batch.tolist())
        self.moments.update(batch)
        return {"y": batch * 2}


def failed_python_run(tmp_path: pathlib.Path, name: str) -> tuple[pathlib.Path, Flaky]:
    switch = tmp_path / "broken"
    switch.touch()
    dataset = Flaky(40, 25, switch)
    store = tmp_path / "p.duckdb"
    with pytest.raises(nbbatch.WorkerFailed):
        torch_batch_process(Mixed, dataset, batch_size=2, checkpoint_interval=2, num_processes=2, store=str(store),
                            run_name=name, progress=False)
    switch.unlink()
    return store, dataset


EXPECTED = {"total": sum(range(40)), "distinct": 40,
            "moments": [float(sum(range(40))), float(sum(i * i for i in range(40))), 40]}


# -- own runs, foreign runs ------------------------------------------------------------------------
def test_own_run_resumes_without_a_trust_step_and_its_states_survive(tmp_path: pathlib.Path) -> None:
    store, dataset = failed_python_run(tmp_path, "mine")
    with duckdb.connect(str(store), read_only=True) as con:
        blobs = [bytes(b) for (b,) in con.execute("SELECT states FROM reducer_state").fetchall()]
    assert blobs and all(not b.startswith(b"\x80") for b in blobs), "the container is JSON, never a pickle"
    per_reducer = [trust.decode_states(b) for b in blobs]
    assert {tuple(s[:1] for s in states) for states in per_reducer} == {(b"J", b"P", b"J")}
    assert isinstance(load_state(per_reducer[0][2])[0], torch.Tensor)
    close_all(str(store))

    run = torch_batch_process(Mixed, dataset, batch_size=2, checkpoint_interval=2, num_processes=2, store=str(store),
                              run_name="mine", progress=False)
    assert run.status == "done"
    assert run.reduced_metrics == EXPECTED


def test_a_run_signed_by_another_user_is_refused_until_trusted(tmp_path: pathlib.Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_SECRET, "alice-" + "a" * 40)
    store, dataset = failed_python_run(tmp_path, "copied")
    monkeypatch.setenv(ENV_SECRET, "bob-" + "b" * 40)
    with pytest.raises(StoreError, match="trust") as refused:
        torch_batch_process(Mixed, dataset, batch_size=2, checkpoint_interval=2, num_processes=2, store=str(store),
                            run_name="copied", progress=False)
    text = str(refused.value)
    assert "signed with another key" in text and "nbbatch show copied" in text and "nbbatch trust copied" in text
    assert "trust=True" in text
    assert run_summary(store, "copied")["attempt"] == 1, "a refused resume starts no attempt"

    run = torch_batch_process(Mixed, dataset, batch_size=2, checkpoint_interval=2, num_processes=2, store=str(store),
                              run_name="copied", progress=False, trust=True)
    assert run.status == "done" and run.reduced_metrics == EXPECTED
    with reader.reading(str(store)) as con:
        records = trust.read_records(con, run.id)
    assert not trust.untrusted(records, run.id, ("bob-" + "b" * 40).encode()), "trusting re-signs with bob's key"


def test_cli_refuses_a_foreign_run_then_trust_shows_and_signs_it(tmp_path: pathlib.Path) -> None:
    alice, bob = {ENV_SECRET: "alice-" + "a" * 40}, {ENV_SECRET: "bob-" + "b" * 40, "NBBATCH_TEST_FAIL_AT": "-1"}
    store = failed_cli_run(tmp_path, "shared", env=alice)

    refused = nbbatch_cli("resume", "shared", "--store", str(store), cwd=tmp_path, env=bob)
    assert refused.returncode == 1, refused.stderr
    assert "trust" in refused.stderr and f"nbbatch trust shared --store {store}" in refused.stderr
    assert f"nbbatch show shared --store {store}" in refused.stderr
    assert run_summary(store, "shared")["attempt"] == 1

    shown = nbbatch_cli("show", "shared", "--store", str(store), cwd=tmp_path, env=bob)
    assert shown.returncode == 0, shown.stderr
    assert field(shown.stdout, "target") == f"{PROCS}:Failing"
    assert field(shown.stdout, "dataset") == f"{PROCS}:numbers(n=30)"
    assert field(shown.stdout, "trust").startswith("NOT TRUSTED: 2 of 2 records not signed by you")
    assert "launch info: NOT signed by you" in shown.stdout

    trusted = nbbatch_cli("trust", "shared", "--store", str(store), cwd=tmp_path, env=bob)
    assert trusted.returncode == 0, trusted.stderr
    assert f"target: {PROCS}:Failing" in trusted.stdout and "reducer state of attempt 1, rank 0" in trusted.stdout

    resumed = nbbatch_cli("resume", "shared", "--store", str(store), cwd=tmp_path, env=bob)
    assert resumed.returncode == 0, resumed.stderr
    assert "run 'shared' done: 15/15 batches, 30 rows" in resumed.stdout
    assert run_summary(store, "shared")["reduced_metrics"] == {"total": sum(range(30))}


# -- planted launch info ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["changed", "inserted"])
def test_a_planted_launch_row_never_runs(tmp_path: pathlib.Path, how: str) -> None:
    on_import, on_call = tmp_path / "imported", tmp_path / "called"
    evil = tmp_path / "evil.py"
    evil.write_text(f"open({str(on_import)!r}, 'w').close()\nfrom procs import Double\n")
    launch = {"target": f"{evil}:Double", "dataset": "subprocess:run",
              "dataset_args": {"args": f"touch {on_call}", "shell": True}, "cwd": str(SCRIPTS)}
    if how == "changed":  # the attacker edits a real, signed run of this user
        store = failed_cli_run(tmp_path, "victim")
        with duckdb.connect(str(store)) as con:
            con.execute("UPDATE runs SET launch = ? WHERE name = 'victim'", [json.dumps(launch)])
    else:  # or adds a run of their own to a store this user opens
        store = tmp_path / "s.duckdb"
        StoreWriter(str(store)).close()
        close_all(str(store))
        with duckdb.connect(str(store)) as con:
            con.execute("INSERT INTO runs (run_id, name, status, processor, dataset_len, batch_size, attempt, "
                        "planned_batches, real_batches, world_size, checkpoint_interval, output_dir, launch, created_at) "
                        "VALUES ('abc123', 'victim', 'failed', 'procs.Double', 30, 2, 1, 15, 15, 1, 2, ?, ?, now())",
                        [str(tmp_path / "out"), json.dumps(launch)])

    resumed = nbbatch_cli("resume", "victim", "--store", str(store), cwd=tmp_path)
    assert resumed.returncode == 1, resumed.stderr
    assert "does not trust them" in resumed.stderr
    assert ("its signature does not match" if how == "changed" else "launch info: unsigned") in resumed.stderr

    shown = nbbatch_cli("show", "victim", "--store", str(store), cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert field(shown.stdout, "dataset") == f'subprocess:run(args="touch {on_call}", shell=true)'
    assert field(shown.stdout, "target") == f"{evil}:Double" and field(shown.stdout, "cwd") == str(SCRIPTS)
    assert field(shown.stdout, "trust").startswith("NOT TRUSTED")

    # the dashboard: the button stays off and says why; its callback and its command refuse too
    from nbbatch._ui.dashboard import app

    board = app.Dashboard(str(store), run="victim")
    board.refresh()
    assert board.detail is not None and board.detail["status"] == "failed"
    assert board.resume_button.disabled
    assert "does not trust them" in str(board.message.object)
    board._on_resume(None)
    assert "cannot resume" in str(board.message.object) and "nbbatch trust victim" in str(board.message.object)
    assert not control.resuming(str(board.detail["run_id"]))
    with pytest.raises(ValueError, match="trust"):
        control.resume(str(store), board.detail)
    spawned = subprocess.run(control.resume_command(str(store), "victim"), cwd=tmp_path, capture_output=True,
                             text=True, timeout=120)
    assert spawned.returncode == 1 and "does not trust them" in spawned.stderr

    with pytest.raises(StoreError, match="trust"):  # from Python too: the run's records are not this user's
        torch_batch_process(procs_class("Failing" if how == "changed" else "Double"), list(range(30)), batch_size=2,
                            checkpoint_interval=2, num_processes=1, store=str(store), run_name="victim", progress=False)
    assert not on_import.exists() and not on_call.exists()


def procs_class(name: str) -> type[Any]:
    """A processor of scripts/procs.py, as the CLI runs it (its fingerprint names `procs.<name>`)."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        import procs

        return getattr(procs, name)  # type: ignore[no-any-return]
    finally:
        sys.path.remove(str(SCRIPTS))


def field(stdout: str, key: str) -> str:
    """The value of ``key:`` in `nbbatch show`'s aligned output."""
    return next(line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith(key + ":"))


# -- planted pickles -------------------------------------------------------------------------------
def test_a_planted_pickle_is_never_loaded(tmp_path: pathlib.Path) -> None:
    marker = tmp_path / "unpickled"
    store = failed_cli_run(tmp_path, "victim")
    bomb = pickle.dumps(Planted(marker))
    with duckdb.connect(str(store)) as con:
        run_id = con.execute("SELECT run_id FROM runs WHERE name = 'victim'").fetchall()[0][0]
        # a new-format container whose one state is a pickle, in place of the signed state ...
        con.execute("UPDATE reducer_state SET states = ? WHERE run_id = ?", [trust.encode_states((b"P" + bomb,)), run_id])
        # ... and a container from before signing that is itself the pickle
        con.execute("INSERT INTO reducer_state VALUES (?, 1, 7, 4, ?)", [run_id, pickle.dumps((b"P" + bomb, bomb))])

    for args in (["show", "victim"], ["show", "victim", "--json"], ["runs"], ["runs", "--json"],
                 ["export", "victim", "--to", str(tmp_path / "out.parquet")]):
        read = nbbatch_cli(*args, "--store", str(store), cwd=tmp_path)
        assert read.returncode == 0, (args, read.stderr)
    shown = nbbatch_cli("show", "victim", "--store", str(store), cwd=tmp_path).stdout
    assert "reducer state of attempt 1, rank 0 (pickled): NOT signed by you" in shown
    assert "reducer state of attempt 1, rank 7 (pickled (written before signing)): UNSIGNED" in shown

    run = nbbatch.open_run("victim", store=str(store))
    assert run.reduced_metrics == {} and run.status == "failed"
    from nbbatch._ui.dashboard import app

    board = app.Dashboard(str(store), run="victim")
    board.refresh()
    assert board.resume_button.disabled and "does not trust them" in str(board.message.object)

    resumed = nbbatch_cli("resume", "victim", "--store", str(store), cwd=tmp_path, env={"NBBATCH_TEST_FAIL_AT": "-1"})
    assert resumed.returncode == 1 and "does not trust them" in resumed.stderr
    with pytest.raises(StoreError, match="trust"):
        torch_batch_process(procs_class("Failing"), list(range(30)), batch_size=2, checkpoint_interval=2,
                            num_processes=1, store=str(store), run_name="victim", progress=False)
    assert not marker.exists()


# -- stores from before signing ----------------------------------------------------------------------
def test_a_store_from_before_signing_is_untrusted_until_resumed_with_trust(tmp_path: pathlib.Path) -> None:
    store = failed_cli_run(tmp_path, "old")
    with duckdb.connect(str(store)) as con:  # rewrite it as an older nbbatch wrote it: bare pickles, no signatures
        for attempt, rank, blob in con.execute("SELECT attempt, rank, states FROM reducer_state").fetchall():
            legacy = tuple(pickle.dumps(load_state(s)) for s in trust.decode_states(bytes(blob)))
            con.execute("UPDATE reducer_state SET states = ? WHERE attempt = ? AND rank = ?",
                        [pickle.dumps(legacy), attempt, rank])
        con.execute("DROP TABLE signatures")

    env = {"NBBATCH_TEST_FAIL_AT": "-1"}
    refused = nbbatch_cli("resume", "old", "--store", str(store), cwd=tmp_path, env=env)
    assert refused.returncode == 1 and "unsigned" in refused.stderr and "nbbatch trust old" in refused.stderr
    resumed = nbbatch_cli("resume", "old", "--trust", "--store", str(store), cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert f"--trust: signing and running run 'old'" in resumed.stderr and f"target: {PROCS}:Failing" in resumed.stderr
    assert run_summary(store, "old")["reduced_metrics"] == {"total": sum(range(30))}, "the old states were used"



# -- torchrun: every rank checks what it imports; one refusal stops all --------------------------------
def torchrun_cli(tmp_path: pathlib.Path, secret: str | None, *args: str,
                 extra: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """`nbbatch ARGS` under two torchrun agents acting as two machines that do not share a home."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k != ENV_SECRET}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
             "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port, "-m", "nbbatch", *args],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**env, "XDG_DATA_HOME": str(tmp_path / f"home{node}"), "OMP_NUM_THREADS": "1",
                 **({ENV_SECRET: secret} if secret else {}), **(extra or {})},
        )
        for node in (0, 1)
    ]
    done = []
    for p in procs:
        try:
            out = p.communicate(timeout=150)[0]
        finally:
            if p.poll() is None:
                p.kill()
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, ""))
    return done


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_torchrun_resume_needs_one_secret_on_every_machine_and_never_hangs(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "s.duckdb"
    common = ["--store", str(store), "--no-progress"]
    first = torchrun_cli(tmp_path, "cluster-" + "c" * 40, "run", f"{PROCS}:Failing", "--dataset", f"{PROCS}:numbers",
                         "--dataset-arg", "n=40", "--batch-size", "2", "--checkpoint-interval", "2", "--name", "tr",
                         *common, extra={"NBBATCH_TEST_FAIL_AT": "16"})
    assert [p.returncode for p in first] == [1, 1], first[0].stdout[-2000:]
    assert run_summary(store, "tr")["status"] == "failed"

    # Without the shared secret each machine has its own key: every rank refuses, promptly, before importing.
    refused = torchrun_cli(tmp_path, None, "resume", "tr", *common)
    assert [p.returncode for p in refused] == [1, 1]
    assert all("does not trust them" in p.stdout for p in refused), refused[1].stdout[-2000:]
    assert run_summary(store, "tr")["attempt"] == 1

    resumed = torchrun_cli(tmp_path, "cluster-" + "c" * 40, "resume", "tr", *common)
    assert [p.returncode for p in resumed] == [0, 0], resumed[0].stdout[-2000:]
    s = run_summary(store, "tr")
    assert s["status"] == "done" and s["attempt"] == 2 and s["reduced_metrics"] == {"total": sum(range(40))}
