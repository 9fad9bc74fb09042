"""The tutorial notebooks run on a real kernel (nbclient), and a kernel interrupt preempts a run."""

from __future__ import annotations

import pathlib
import queue
import shutil
import time

import duckdb
import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


def execute(name: str, cwd: pathlib.Path) -> nbformat.NotebookNode:
    shutil.copy(ROOT / "notebooks" / name, cwd / name)
    book = nbformat.read(cwd / name, as_version=4)
    NotebookClient(book, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(cwd)}}).execute()
    return book


def text(cell: nbformat.NotebookNode) -> str:
    out = []
    for o in cell.get("outputs", []):
        out.append(o.get("text", ""))
        out.extend(str(v) for k, v in o.get("data", {}).items() if k in ("text/plain", "text/html"))
    return "\n".join(out)


def test_quickstart_notebook(tmp_path: pathlib.Path) -> None:
    book = execute("01_quickstart.ipynb", tmp_path)
    con = duckdb.connect(str(tmp_path / "nbbatch.duckdb"), read_only=True)
    runs = dict(con.execute("SELECT name, status FROM runs").fetchall())
    assert runs == {"quickstart": "done", "slow": "done"}
    for name in runs:
        run_id = con.execute("SELECT run_id FROM runs WHERE name = ?", [name]).fetchone()[0]
        count, distinct, low, high = con.execute(
            f"SELECT count(*), count(DISTINCT sample_index), min(sample_index), max(sample_index) FROM outputs_{run_id}"
        ).fetchone()
        assert (count, distinct, low, high) == (1000, 1000, 0, 999), name
    attempts = con.execute("SELECT attempt FROM runs WHERE name = 'slow'").fetchone()[0]
    assert attempts == 2, "the slow run was stopped once and resumed once"
    stopped = [text(c) for c in book.cells if "slow.stop()" in c.source][0]
    assert stopped.startswith("preempted"), stopped
    sql = [text(c) for c in book.cells if "features_type" in c.source][0]
    assert "FLOAT[3]" in sql and "1000" in sql
    final = text(book.cells[-1])
    assert "done [(1000, 1000)]" in final and "mean_norm" in final
    # The live display leaves a static summary behind in the saved notebook.
    assert any("nbbatch</b> run" in text(c) for c in book.cells if "%batchprocess" in c.source)


def test_batch_inference_notebook(tmp_path: pathlib.Path) -> None:
    book = execute("02_batch_inference.ipynb", tmp_path)
    final = text(book.cells[-1])
    assert final.startswith("256 True {'accuracy': ")
    accuracy = float(final.split("'accuracy': ")[1].rstrip("}\n"))
    assert 0.0 <= accuracy <= 1.0
    con = duckdb.connect(str(tmp_path / "nbbatch.duckdb"), read_only=True)
    run_id, reduced = con.execute("SELECT run_id, reduced_metrics FROM runs WHERE name = 'cifar'").fetchone()
    correct = con.execute(f"SELECT avg((prediction = label)::INT) FROM outputs_{run_id}").fetchone()[0]
    assert correct == pytest.approx(accuracy), "the reducer agrees with the stored predictions"
    assert con.execute("SELECT count(*) FROM metrics WHERE run_id = ? AND name = 'batch_accuracy'", [run_id]).fetchone()[0] == 8


def _run_cell(client, code: str, timeout: float = 120) -> list[dict]:
    msg_id = client.execute(code)
    outputs = []
    deadline = time.monotonic() + timeout
    while True:
        try:
            msg = client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            raise TimeoutError(code) from None
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
            return outputs
        outputs.append(msg)


def test_kernel_interrupt_preempts_and_the_same_line_resumes(tmp_path: pathlib.Path) -> None:
    from jupyter_client.manager import start_new_kernel

    km, kc = start_new_kernel(kernel_name="python3", cwd=str(tmp_path))
    try:
        setup = (
            "import time, torch\nfrom nbbatch import TorchBatchProcessor\n"
            "class Slow(TorchBatchProcessor):\n"
            "    def __init__(self, context):\n        self.total = context.wrap_reducer(lambda v: sum(v), name='total')\n"
            "    def process_batch(self, batch, batch_idx):\n        time.sleep(0.1)\n"
            "        self.total.update(int(batch.sum()))\n        return batch * 1\n"
            "data = list(range(300))\n%load_ext nbbatch\n"
        )
        _run_cell(kc, setup)
        line = "%batchprocess Slow data --batch-size 3 --processes 2 --checkpoint-interval 2 --name interrupted --no-progress"
        msg_id = kc.execute(line)
        store = tmp_path / "nbbatch.duckdb"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until batches are committed
            time.sleep(0.3)
            if store.exists():
                try:
                    con = duckdb.connect(str(store), read_only=True)
                    done = con.execute("SELECT count(*) FROM batches").fetchone()[0]
                    con.close()
                except duckdb.Error:
                    continue
                if done >= 4:
                    break
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=60)
        while reply["parent_header"].get("msg_id") != msg_id:
            reply = kc.get_shell_msg(timeout=60)
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        status = _run_cell(kc, "print(_run.status, _run.counts['committed_batches'])")
        printed = "".join(m["content"].get("text", "") for m in status if m["msg_type"] == "stream")
        assert printed.startswith("preempted"), printed
        assert int(printed.split()[1]) < 100
        _run_cell(kc, line)
        result = _run_cell(kc, "print(_run.status, _run.reduced_metrics['total'], _run.sql('SELECT count(*), count(DISTINCT sample_index) FROM outputs').fetchall())")
        printed = "".join(m["content"].get("text", "") for m in result if m["msg_type"] == "stream")
        assert printed.strip() == f"done {sum(range(300))} [(300, 300)]", printed
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
