"""The README's quick start and the examples run as written, in fresh processes."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import duckdb
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.timeout(240)


def _python(args: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=220)


def test_readme_quick_start_runs_as_written(tmp_path: pathlib.Path) -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S)
    assert code is not None, "the quick start must hold a python block"
    (tmp_path / "quick.py").write_text(code.group(1))
    done = _python(["quick.py"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "done {'total': 499500}" in done.stdout
    assert "square" in done.stdout
    con = duckdb.connect(str(tmp_path / "nbbatch.duckdb"), read_only=True)
    table = con.execute("SELECT 'outputs_' || run_id FROM runs").fetchone()[0]
    assert con.execute(f"SELECT count(DISTINCT sample_index), sum(square) FROM {table}").fetchone() == (
        1000,
        sum(i * i for i in range(1000)),
    )


def test_cifar_example_stores_predictions_and_files(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "demo.duckdb"
    done = _python([str(ROOT / "examples" / "cifar_inference.py"), "--size", "256", "--store", str(store)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "256 predictions in 4 batches" in done.stdout
    assert f"nbbatch dashboard --store {store}" in done.stdout
    accuracy = float(re.search(r"'accuracy': ([0-9.]+)", done.stdout).group(1))
    assert 0.0 <= accuracy <= 1.0
    files = sorted(p.name for p in (tmp_path / "demo_outputs").rglob("prediction_output_*"))
    assert files, "upload_path files must land in the run's output folder"


def test_embeddings_example_finds_itself_first(tmp_path: pathlib.Path) -> None:
    store = tmp_path / "emb.duckdb"
    done = _python([str(ROOT / "examples" / "embeddings.py"), "--size", "128", "--store", str(store)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "FLOAT[512]" in done.stdout
    first = done.stdout.strip().splitlines()[-5]
    assert first.split()[0] == "0" and float(first.split()[-1]) == pytest.approx(1.0, abs=1e-5)
