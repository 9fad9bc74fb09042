"""``nbbatch.dashboard(store)`` in a real Jupyter kernel (nbclient): it displays inline as a Panel app."""

from __future__ import annotations

import json
import pathlib
import sys

import pytest

pytestmark = [pytest.mark.slow]


@pytest.mark.timeout(180)
def test_dashboard_displays_inline_in_a_notebook(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
    import dashboard_queries as bench

    store = tmp_path / "nb.duckdb"
    bench.build(str(store), 640, runs=2)
    spec = tmp_path / "jupyter" / "kernels" / "nbbatch-dash"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "nbbatch dashboard test", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    book = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell(f"import nbbatch\nboard = nbbatch.dashboard({str(store)!r}, run='run1')\nboard"),
        nbformat.v4.new_code_cell("state = board._nbbatch_dashboard\nprint(state.refreshes, state.run_id)"),
    ])
    nbclient.NotebookClient(book, timeout=120, kernel_name="nbbatch-dash",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    shown = book.cells[0].outputs
    kinds = {key for out in shown for key in out.get("data", {})}
    assert "application/vnd.holoviews_exec.v0+json" in kinds, kinds  # Panel's inline app, live over a comm
    assert not [out for out in shown if out.get("output_type") == "error"]
    printed = "".join(out.get("text", "") for out in book.cells[1].outputs)
    assert printed.split()[1] == f"{1:032x}" and int(printed.split()[0]) >= 1, printed
