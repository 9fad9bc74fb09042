"""The tutorial notebooks on a real kernel (nbclient), and a kernel interrupt that preempts a run.

The kernel runs this interpreter (see ``conftest.kernel_name``) in a temporary working directory;
the assertions read the DuckDB store the notebook wrote.
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil

import duckdb
import helpers
import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def execute(notebooks_dir: pathlib.Path, name: str, cwd: pathlib.Path, kernel_name: str) -> nbformat.NotebookNode:
    shutil.copy(notebooks_dir / name, cwd / name)
    book = nbformat.read(cwd / name, as_version=4)
    assert all(not c.get("outputs") for c in book.cells if c.cell_type == "code"), "notebooks are stored without outputs"
    NotebookClient(book, timeout=240, kernel_name=kernel_name, resources={"metadata": {"path": str(cwd)}}).execute()
    return book


def text(cell: nbformat.NotebookNode) -> str:
    out = []
    for o in cell.get("outputs", []):
        out.append(o.get("text", ""))
        out.extend(str(v) for k, v in o.get("data", {}).items() if k in ("text/plain", "text/html"))
    return "\n".join(out)


def cell_with(book: nbformat.NotebookNode, snippet: str) -> nbformat.NotebookNode:
    return next(c for c in book.cells if c.cell_type == "code" and snippet in c.source)


def coverage(con: duckdb.DuckDBPyConnection, name: str) -> tuple[int, int, int, int]:
    run_id = con.execute("SELECT run_id FROM runs WHERE name = ?", [name]).fetchone()[0]
    return con.execute(
        f"SELECT count(*), count(DISTINCT sample_index), min(sample_index), max(sample_index) FROM outputs_{run_id}"
    ).fetchone()


def test_quickstart_notebook(notebooks_dir: pathlib.Path, tmp_path: pathlib.Path, kernel_name: str) -> None:
    book = execute(notebooks_dir, "01_quickstart.ipynb", tmp_path, kernel_name)
    with duckdb.connect(str(tmp_path / "nbbatch.duckdb"), read_only=True) as con:
        runs = dict(con.execute("SELECT name, status FROM runs").fetchall())
        assert runs == {"quickstart": "done", "squares": "done", "slow": "done"}
        for name in runs:
            assert coverage(con, name) == (1000, 1000, 0, 999), name
        attempts, reduced = con.execute("SELECT attempt, reduced_metrics FROM runs WHERE name = 'slow'").fetchone()
        assert attempts == 2, "the slow run was stopped once and resumed once"
        quick = con.execute("SELECT reduced_metrics FROM runs WHERE name = 'quickstart'").fetchone()[0]
    # Both runs use equal-size batches, so the mean of batch means is the mean over all 1000 samples.
    assert json.loads(reduced)["mean_norm"] == pytest.approx(json.loads(quick)["mean_norm"], rel=1e-6), (
        "the resumed run's reducer covers the whole dataset"
    )
    stopped = text(cell_with(book, "slow.stop()"))
    assert stopped.startswith("preempted"), stopped
    assert int(stopped.split()[1]) < 100
    sql = text(cell_with(book, "features_type"))
    assert "FLOAT[3]" in sql and "1000" in sql
    assert str(sum(i * i for i in range(1000))) in text(cell_with(book, "sum(square)"))
    final = text(book.cells[-1])
    assert "done [(1000, 1000)]" in final and "mean_norm" in final
    # A blocking run's live display leaves a static summary behind in the saved notebook.
    for snippet in ("%batchprocess Featurize", "%%batchprocess"):
        shown = text(cell_with(book, snippet))
        assert "nbbatch</b> run" in shown and "nbbatch-summary" in shown, snippet
        assert "application/vnd.jupyter.widget-view+json" not in str(cell_with(book, snippet).outputs)
    # A background run ends during a later cell; the display update still reaches its own cell,
    # and the widget itself holds the summary too (for frontends that drop such updates).
    shown = text(cell_with(book, "--background"))
    assert "nbbatch-summary" in shown and "<code>slow</code>" in shown and "preempted" in shown, shown
    states = book.metadata["widgets"]["application/vnd.jupyter.widget-state+json"]["state"].values()
    final = [m["state"]["value"] for m in states if "nbbatch-summary" in str(m["state"].get("value", ""))]
    assert any("<code>slow</code>" in v and "preempted" in v for v in final), final
    resumed = text(cell_with(book, "run_name=\"slow\""))
    assert "nbbatch-summary" in resumed and "nbbatch-run" in resumed  # live display, then the Run's own HTML


def test_batch_inference_notebook(notebooks_dir: pathlib.Path, tmp_path: pathlib.Path, kernel_name: str) -> None:
    book = execute(notebooks_dir, "02_batch_inference.ipynb", tmp_path, kernel_name)
    final = text(book.cells[-1])
    assert final.startswith("256 True {'accuracy': ")
    accuracy = float(final.split("'accuracy': ")[1].rstrip("}\n"))
    assert 0.0 <= accuracy <= 1.0
    with duckdb.connect(str(tmp_path / "nbbatch.duckdb"), read_only=True) as con:
        assert coverage(con, "cifar") == (256, 256, 0, 255)
        run_id, status = con.execute("SELECT run_id, status FROM runs WHERE name = 'cifar'").fetchone()
        assert status == "done"
        correct = con.execute(f"SELECT avg((prediction = label)::INT) FROM outputs_{run_id}").fetchone()[0]
        batches = con.execute(
            "SELECT count(*) FROM metrics WHERE run_id = ? AND name = 'batch_accuracy'", [run_id]
        ).fetchone()[0]
    assert correct == pytest.approx(accuracy), "the reducer agrees with the stored predictions"
    assert batches == 8
    assert "first outputs" in text(cell_with(book, "the Run's summary"))


def test_tables_notebook(notebooks_dir: pathlib.Path, tmp_path: pathlib.Path, kernel_name: str) -> None:
    book = execute(notebooks_dir, "03_tables.ipynb", tmp_path, kernel_name)
    assert text(book.cells[-1]).strip() == "64 True img_000.png"
    assert "'path': [" in text(cell_with(book, "DataLoader(images"))  # a batch is a dict of columns
    summary = text(cell_with(book, "GROUP BY label"))
    assert "images" in summary and "confidence" in summary
    with duckdb.connect(str(tmp_path / "nbbatch.duckdb"), read_only=True) as con:
        assert coverage(con, "tables") == (64, 64, 0, 63)
        assert con.execute("SELECT rows FROM run_inputs JOIN runs USING (run_id) WHERE name = 'tables'").fetchone() == (64,)


def test_kernel_interrupt_preempts_and_the_same_line_resumes(tmp_path: pathlib.Path, kernel_name: str) -> None:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name=kernel_name, cwd=str(tmp_path))
    try:
        setup = (
            "import time, torch\nfrom nbbatch import TorchBatchProcessor\n"
            "class Slow(TorchBatchProcessor):\n"
            "    def __init__(self, context):\n        self.total = context.wrap_reducer(lambda v: sum(v), name='total')\n"
            "    def process_batch(self, batch, batch_idx):\n        time.sleep(0.1)\n"
            "        self.total.update(int(batch.sum()))\n        return batch * 1\n"
            "data = list(range(300))\n%load_ext nbbatch\n"
        )
        helpers.run_cell(kc, setup)
        # With the widget display (a Jupyter kernel): the interrupt must still preempt cleanly.
        line = "%batchprocess Slow data --batch-size 3 --processes 2 --checkpoint-interval 2 --name interrupted"
        msg_id = kc.execute(line)
        store = tmp_path / "nbbatch.duckdb"
        helpers.poll(lambda: helpers.committed(store, "interrupted") >= 4, 90, "4 committed batches", every=0.3)
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=60)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=60)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert "resume with run_name='interrupted'" in reply["content"]["evalue"]
        shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(reply["content"]["traceback"]))
        assert "%batchprocess: to resume (committed batches are kept), run the same line again" in shown, shown
        assert "_api.py" not in shown and "local.py" not in shown, "the launcher's frames are left out"
        printed = helpers.stream_text(helpers.run_cell(kc, "print(_run.status, _run.counts['committed_batches'])"))
        status, committed = printed.split()
        assert status == "preempted" and 4 <= int(committed) < 100, printed
        resumed = helpers.run_cell(kc, line)
        shown = "".join(str(m["content"].get("data", {}).get("text/html", "")) for m in resumed)
        assert "nbbatch-summary" in shown
        check = (
            "print(_run.status, _run.reduced_metrics['total'], "
            "_run.sql('SELECT count(*), count(DISTINCT sample_index), min(sample_index), max(sample_index) FROM outputs').fetchall())"
        )
        assert helpers.stream_text(helpers.run_cell(kc, check)).strip() == f"done {sum(range(300))} [(300, 300, 0, 299)]"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
