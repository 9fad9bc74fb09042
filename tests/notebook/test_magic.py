"""The magics in a real IPython shell: processors defined through `run_cell` live in `__main__`."""

from __future__ import annotations

import pathlib
from collections.abc import Iterator

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import nbbatch

pytestmark = pytest.mark.timeout(120)

SETUP = """
import torch
from nbbatch import TorchBatchProcessor

class Double(TorchBatchProcessor):
    def __init__(self, context):
        self.total = context.wrap_reducer(lambda values: sum(values), name="total")
    def process_batch(self, batch, batch_idx):
        self.total.update(int(batch.sum()))
        return {"double": batch * 2}

class Broken(TorchBatchProcessor):
    def __init__(self, context):
        pass
    def process_batch(self, batch, batch_idx):
        if batch_idx == 1:
            raise KeyError("missing feature")
        return batch

data = list(range(40))
"""

PLUS = (
    "class Plus(TorchBatchProcessor):\n"
    "    def __init__(self, context):\n        pass\n"
    "    def process_batch(self, batch, batch_idx):\n        return batch + 1\n"
)


@pytest.fixture
def shell(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[InteractiveShell]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("NBBATCH_STORE", raising=False)
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "nbbatch")
    assert sh.run_cell(SETUP).success
    yield sh
    sh.run_line_magic("unload_ext", "nbbatch")
    InteractiveShell.clear_instance()


def _column(run: nbbatch.Run, name: str) -> list[object]:
    return [r[0] for r in run.sql(f"SELECT {name} FROM outputs ORDER BY sample_index").fetchall()]


def test_load_ext_registers_line_and_cell_magic(shell: InteractiveShell) -> None:
    assert shell.find_line_magic("batchprocess") is not None
    assert shell.find_cell_magic("batchprocess") is not None


def test_line_magic_runs_and_leaves_the_run(shell: InteractiveShell, tmp_path: pathlib.Path) -> None:
    run = shell.run_line_magic("batchprocess", "Double data --batch-size 8 --processes 2 --name first --no-progress")
    assert isinstance(run, nbbatch.Run)
    assert shell.user_ns["_run"].id == run.id and run.name == "first"
    assert run.status == "done" and run.reduced_metrics == {"total": sum(range(40))}
    assert _column(run, "sample_index") == list(range(40))
    assert _column(run, "double") == [2 * i for i in range(40)]
    assert (tmp_path / "nbbatch.duckdb").exists()


def test_options_reach_torch_batch_process(shell: InteractiveShell, tmp_path: pathlib.Path) -> None:
    store = tmp_path / "other.duckdb"
    run = shell.run_line_magic(
        "batchprocess",
        f"Double data --store {store} --out result --batch-size 4 --checkpoint-interval 2 --max-batches 3 --no-progress",
    )
    assert shell.user_ns["result"] is run and "_run" not in shell.user_ns
    assert run.store == str(store)
    summary = run.summary
    assert (summary["batch_size"], summary["checkpoint_interval"], summary["max_batches"]) == (4, 2, 3)
    assert run.counts["rows"] == 12 and _column(run, "sample_index") == list(range(12))


def test_default_name_is_generated(shell: InteractiveShell) -> None:
    run = shell.run_line_magic("batchprocess", "Double data --no-progress")
    assert run.name.startswith("nb-") and len(run.name) == len("nb-20260101-120000-abcd")


def test_terminal_shell_falls_back_to_text_progress(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    shell.run_line_magic("batchprocess", "Double data --batch-size 10 --name texty")
    assert "nbbatch texty: done 4/4 batches (100%)" in capsys.readouterr().err


def test_cell_magic_runs_the_class_the_cell_defines(shell: InteractiveShell) -> None:
    run = shell.run_cell_magic("batchprocess", "--dataset data --batch-size 16 --no-progress", PLUS)
    assert _column(run, "output") == [i + 1 for i in range(40)]
    assert shell.user_ns["Plus"].__module__ == "__main__"


def test_cell_magic_redefining_a_class_picks_it(shell: InteractiveShell) -> None:
    cell = PLUS.replace("Plus", "Double")  # redefines an existing name: still "defined by the cell"
    run = shell.run_cell_magic("batchprocess", "--dataset data --no-progress", cell)
    assert _column(run, "output")[:3] == [1, 2, 3]


def test_cell_magic_processor_option_chooses(shell: InteractiveShell) -> None:
    cell = PLUS + PLUS.replace("Plus", "Minus").replace("batch + 1", "batch - 1")
    with pytest.raises(UsageError, match=r"several processors \(Minus, Plus\); choose one with --processor"):
        shell.run_cell_magic("batchprocess", "--dataset data --no-progress", cell)
    run = shell.run_cell_magic("batchprocess", "--dataset data --processor Minus --no-progress", cell)
    assert _column(run, "output")[:2] == [-1, 0]


def test_cell_errors_propagate_as_they_are(shell: InteractiveShell) -> None:
    with pytest.raises(ZeroDivisionError):
        shell.run_cell_magic("batchprocess", "--dataset data", "1 / 0\n")


@pytest.mark.parametrize(
    "line,text",
    [
        ("Missing data", "no processor class named 'Missing' in the notebook"),
        ("Double nothing", "no dataset named 'nothing' in the notebook"),
        ("", "usage: %batchprocess Processor dataset"),
        ("Double", "Double needs a dataset"),
        ("Double data extra", "unrecognized arguments: extra"),
        ("Double data --batch-size many", "invalid int value: 'many'"),
        ("Double data --on-error ignore", "invalid choice: 'ignore'"),
        ("Double data --out 1x", "--out must be a Python variable name"),
        ("data data", "'data' is a list, not a class"),
        ("torch data", "'torch' is a module, not a class"),
    ],
)
def test_bad_usage_is_a_usage_error(shell: InteractiveShell, line: str, text: str) -> None:
    with pytest.raises(UsageError, match=text) as info:
        shell.run_line_magic("batchprocess", line + " --no-progress")
    assert type(info.value) is UsageError  # a subclass would get a traceback in IPython
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "line,cell,text",
    [
        ("--dataset data", "x = 1\n", "defines no TorchBatchProcessor subclass"),
        ("", PLUS, "needs --dataset NAME"),
        ("data", PLUS, "takes no positional names"),
        ("--dataset nothing", PLUS, "no dataset named 'nothing'"),
        ("--dataset data --processor Nope", PLUS, "no processor class named 'Nope'"),
    ],
)
def test_cell_magic_bad_usage(shell: InteractiveShell, line: str, cell: str, text: str) -> None:
    with pytest.raises(UsageError, match=text):
        shell.run_cell_magic("batchprocess", line + " --no-progress", cell)


@pytest.mark.parametrize(
    "options,text",
    [
        ("--batch-size 0", "--batch-size must be at least 1, got 0"),
        ("--processes -1", "--processes must be at least 1, got -1"),
        ("--checkpoint-interval 0", "--checkpoint-interval must be at least 1, got 0"),
        ("--max-failures -2", "--max-failures must be at least 0, got -2"),
        ("--name ../x", r"--name: a run name must be letters, digits and `\._-`"),
        ("--name=--help", "not starting with `-` or `.`, got '--help'"),
    ],
)
def test_bad_values_are_one_line_usage_errors(shell: InteractiveShell, options: str, text: str) -> None:
    with pytest.raises(UsageError, match=text) as info:
        shell.run_line_magic("batchprocess", f"Double data {options} --no-progress")
    assert type(info.value) is UsageError and "\n" not in str(info.value)
    assert not pathlib.Path("nbbatch.duckdb").exists()  # refused before anything ran


def test_help_text(shell: InteractiveShell) -> None:
    doc = shell.find_line_magic("batchprocess").__doc__
    for option in ("--batch-size", "--processes", "--checkpoint-interval", "--max-batches", "--name", "--store",
                   "--on-error", "--max-failures", "--out", "--background", "Interrupt the kernel"):
        assert option in doc, option
    assert shell.find_cell_magic("batchprocess").__doc__ == doc


def test_help_through_the_question_mark(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    assert shell.run_cell("%batchprocess?").success
    page = capsys.readouterr().out
    for text in ("%batchprocess [--dataset DATASET_NAME]", "--batch-size BATCH_SIZE", "--background",
                 "--on-error", "Samples per batch", "%%batchprocess --dataset dataset"):
        assert text in page, text


def test_errors_read_well_in_a_cell(shell: InteractiveShell, capsys: pytest.CaptureFixture[str]) -> None:
    result = shell.run_cell("%batchprocess Missing data")
    assert type(result.error_in_exec) is UsageError
    shown = "".join(capsys.readouterr())
    assert shown.strip() == "UsageError: no processor class named 'Missing' in the notebook; define it in a cell first, or check the spelling"
    shell.run_cell("%colors nocolor")
    result = shell.run_cell("%batchprocess Broken data --batch-size 4 --no-progress")
    assert isinstance(result.error_in_exec, nbbatch.WorkerFailed)
    shown = "".join(capsys.readouterr())
    # The cell line, the message with the worker's own traceback, and how to resume; no launcher frames.
    assert "KeyError: 'missing feature'" in shown and "--- remote traceback (rank 0) ---" in shown
    assert f"run the line again with `--name {result.error_in_exec.run_name}`" in shown
    for internal in ("_api.py", "local.py", "supervisor.py", "writer.py"):
        assert internal not in shown, internal


def test_worker_failure_propagates_with_the_run_left_behind(shell: InteractiveShell) -> None:
    with pytest.raises(nbbatch.WorkerFailed) as info:
        shell.run_line_magic("batchprocess", "Broken data --batch-size 4 --name broken --no-progress")
    assert "KeyError" in info.value.remote_traceback and info.value.batch_idx == 1
    assert shell.user_ns["_run"].status == "failed" and shell.user_ns["_run"].name == "broken"


def test_skip_mode_records_failures(shell: InteractiveShell) -> None:
    run = shell.run_line_magic("batchprocess", "Broken data --batch-size 4 --on-error skip --max-failures 5 --no-progress")
    assert run.status == "done" and run.counts["rows"] == 36
    assert run.errors().fetchall()[0][6] == "KeyError"


def test_background_returns_at_once_and_wait_joins(shell: InteractiveShell) -> None:
    run = shell.run_line_magic("batchprocess", "Double data --batch-size 4 --background --no-progress --out bg")
    assert shell.user_ns["bg"] is run and run.name.startswith("nb-")
    assert run.wait(timeout=100).status == "done"
    assert run.counts["rows"] == 40 and run.reduced_metrics == {"total": sum(range(40))}
    bad = shell.run_line_magic("batchprocess", "Broken data --batch-size 4 --background --no-progress")
    with pytest.raises(nbbatch.WorkerFailed, match="missing feature"):
        bad.wait(timeout=100)
    assert bad.status == "failed"


def test_second_live_run_on_the_same_store_is_refused_and_named(shell: InteractiveShell) -> None:
    shell.run_cell(
        "import time\nclass Slow(Double):\n    def process_batch(self, batch, batch_idx):\n"
        "        time.sleep(0.2)\n        return super().process_batch(batch, batch_idx)\n"
    )
    run = shell.run_line_magic("batchprocess", "Slow data --batch-size 2 --background --no-progress --out slow")
    with pytest.raises(nbbatch.StoreBusy, match="in use by a live run") as info:
        shell.run_line_magic("batchprocess", "Double data --no-progress")
    note = "\n".join(getattr(info.value, "__notes__", []))
    assert "`slow.wait()`" in note and "`slow.stop()`" in note and "--store" in note
    run.stop()
    assert run.wait(timeout=100).status == "preempted"
    resumed = shell.run_line_magic("batchprocess", f"Slow data --batch-size 2 --name {run.name} --no-progress")
    assert resumed.id == run.id and resumed.status == "done"
    assert _column(resumed, "sample_index") == list(range(40))


def test_repr_html_shows_status_metrics_outputs_escaped(shell: InteractiveShell) -> None:
    run = shell.run_line_magic("batchprocess", "Double data --batch-size 4 --name x --no-progress")
    import duckdb  # names are a safe set now; a store from an older nbbatch may still hold markup

    with duckdb.connect(run.store) as con:
        con.execute("UPDATE runs SET name = '<b>x</b>' WHERE run_id = ?", [run.id])
    page = run._repr_html_()
    assert "&lt;b&gt;x&lt;/b&gt;" in page and "<b>x</b>" not in page
    for text in ("done", "10/10 committed", "samples/s", "reduced metrics", "total", str(sum(range(40))),
                 "first outputs", "double", "sample_index"):
        assert text in page, text
    assert page.count("<tr") == 7 + 1 + 6  # fields, metric, header + 5 output rows


def test_repr_html_clips_long_values(shell: InteractiveShell) -> None:
    shell.run_cell(
        "class Wide(TorchBatchProcessor):\n    def __init__(self, context):\n        pass\n"
        "    def process_batch(self, batch, batch_idx):\n"
        "        return {'vector': batch.float().unsqueeze(1).repeat(1, 64), 'text': ['<x>' * 40] * len(batch)}\n"
    )
    run = shell.run_line_magic("batchprocess", "Wide data --batch-size 8 --no-progress")
    page = run._repr_html_()
    assert page.count("…") == 10  # 5 rows x 2 long columns
    assert "&lt;x&gt;" in page and "<x>" not in page
    assert len(run.outputs().fetchall()[0][-1]) == 120, "only the preview is clipped"
