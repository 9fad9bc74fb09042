"""Store errors seen by a user of `torch_batch_process`: unwritable paths, outputs that change type."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest

import nbbatch
from nbbatch import StoreError, TorchBatchProcessor, torch_batch_process

pytestmark = pytest.mark.timeout(120)


class Echo(TorchBatchProcessor):
    def __init__(self, context: Any) -> None:
        pass

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        return {"y": batch}


class ChangesType(TorchBatchProcessor):
    """Numbers for the first batches, strings from global batch 4 on (after the first commit)."""

    def __init__(self, context: Any) -> None:
        pass

    def process_batch(self, batch: Any, batch_idx: int) -> Any:
        if int(batch[0]) >= 8:
            return {"y": [f"text-{int(v)}" for v in batch]}
        return {"y": batch.float() + 0.5}


def test_sysfs_path_is_a_store_error(tmp_path: pathlib.Path) -> None:
    # /sys refuses new files even to root, so this works whoever runs the tests.
    if os.path.exists("/sys/nbbatch-test.duckdb") or not os.path.isdir("/sys/kernel"):
        pytest.skip("no sysfs here")
    with pytest.raises(StoreError, match=r"cannot write to the store `/sys/nbbatch-test.duckdb` .*writable path"):
        torch_batch_process(Echo, list(range(4)), store="/sys/nbbatch-test.duckdb", progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; the /sys test covers this as root")
def test_read_only_directory_is_a_store_error(tmp_path: pathlib.Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(StoreError, match="writable path"):
            torch_batch_process(Echo, list(range(4)), store=str(folder / "s.duckdb"), progress=False)
    finally:
        folder.chmod(0o755)


def test_output_type_change_fails_with_a_clear_error_and_keeps_committed_batches(tmp_path: pathlib.Path) -> None:
    store = str(tmp_path / "s.duckdb")
    with pytest.raises(StoreError, match="type") as info:
        torch_batch_process(ChangesType, list(range(16)), batch_size=2, checkpoint_interval=1, store=store,
                            run_name="t", progress=False)
    assert "TransactionContext" not in str(info.value), "the real cause must not be hidden"
    run = nbbatch.open_run("t", store=store)
    assert run.status == "failed"
    samples = [s for (s,) in run.outputs().project("sample_index").fetchall()]
    assert samples == list(range(len(samples))) and len(samples) <= 8, "only whole committed batches remain"
