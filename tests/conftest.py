"""Suite-wide test setup: `helpers` importable everywhere; the fault matrix's full cross product opt-in.

Tests marked ``matrix_full`` (the fault matrix beyond one trigger point per fault) are deselected
unless ``NBBATCH_FULL_MATRIX=1`` or the ``-m`` expression names ``matrix_full``.
"""

from __future__ import annotations

import os
import pathlib
import sys

import pytest

HERE = str(pathlib.Path(__file__).resolve().parent)
if HERE not in sys.path:
    sys.path.insert(0, HERE)


def full_matrix(config: pytest.Config) -> bool:
    return os.environ.get("NBBATCH_FULL_MATRIX") == "1" or "matrix_full" in (config.getoption("markexpr") or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if full_matrix(config):
        return
    keep: list[pytest.Item] = []
    drop: list[pytest.Item] = []
    for item in items:
        (drop if item.get_closest_marker("matrix_full") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
