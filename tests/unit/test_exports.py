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
