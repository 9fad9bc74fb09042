"""The public surface: `__all__` matches the namespace, names report `nbbatch` as their module."""

from __future__ import annotations

import inspect

import pytest

import nbbatch

pytestmark = pytest.mark.timeout(60)


def test_all_is_sorted_and_complete() -> None:
    public = sorted((name for name in dir(nbbatch) if not name.startswith("_")), key=str.lower)
    assert nbbatch.__all__ == sorted(nbbatch.__all__, key=str.lower)
    assert set(public) - {"annotations", "importlib", "TYPE_CHECKING", "Any"} == set(nbbatch.__all__)


@pytest.mark.parametrize("name", [n for n in nbbatch.__all__ if n[0].isupper() or n == "torch_batch_process"])
def test_public_names_live_in_nbbatch(name: str) -> None:
    value = getattr(nbbatch, name)
    if inspect.isclass(value) or inspect.isfunction(value):
        assert value.__module__ == "nbbatch"


def test_determined_names_import() -> None:
    from nbbatch import MetricReducer, TorchBatchProcessor, TorchBatchProcessorContext, torch_batch_process

    assert callable(torch_batch_process)
    assert inspect.isabstract(TorchBatchProcessor)
    assert inspect.isabstract(MetricReducer)
    assert TorchBatchProcessorContext.__name__ == "TorchBatchProcessorContext"


def test_unknown_name_is_attribute_error() -> None:
    with pytest.raises(AttributeError):
        nbbatch.does_not_exist  # noqa: B018


def test_table_dataset_is_public_and_pickles_by_its_public_name() -> None:
    import pickle

    assert "TableDataset" in nbbatch.__all__
    ds = nbbatch.TableDataset("SELECT range AS x FROM range(3) ORDER BY x")
    assert pickle.loads(pickle.dumps(ds))[2] == {"x": 2}
    assert b"nbbatch" in pickle.dumps(ds) and b"_table" not in pickle.dumps(ds)


def test_status_is_public_and_compares_as_a_plain_string() -> None:
    import json
    import pickle

    assert "Status" in nbbatch.__all__
    assert [s.value for s in nbbatch.Status] == ["running", "done", "failed", "preempted", "interrupted"]
    done = nbbatch.Status("done")
    assert done == "done" and str(done) == "done" and f"{done}" == "done" and json.dumps(done) == '"done"'
    assert "interrupted" in {nbbatch.Status.INTERRUPTED} and nbbatch.Status.INTERRUPTED.resumable
    assert not nbbatch.Status.DONE.resumable and not nbbatch.Status.RUNNING.resumable
    assert pickle.loads(pickle.dumps(done)) is done
