"""A Jupyter kernelspec that runs this interpreter (the venv's python), for nbclient and jupyter_client."""

from __future__ import annotations

import json
import os
import pathlib
import sys
from collections.abc import Iterator

import pytest

KERNEL_NAME = "nbbatch-test"


@pytest.fixture(scope="session")
def kernel_name(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Name of a kernelspec whose argv is ``sys.executable -m ipykernel_launcher`` (found via JUPYTER_PATH)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL_NAME
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nbbatch tests", "language": "python",
        # Workers must not inherit a store path from the environment running the tests.
        "env": {"NBBATCH_STORE": ""},
    }))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(root), *([old] if old else [])])
    try:
        yield KERNEL_NAME
    finally:
        if old is None:
            os.environ.pop("JUPYTER_PATH", None)
        else:
            os.environ["JUPYTER_PATH"] = old


@pytest.fixture
def notebooks_dir() -> pathlib.Path:
    return pathlib.Path(__file__).resolve().parents[2] / "notebooks"
