"""The Run handle: a view of one run in the store, returned by `torch_batch_process`.

It holds only the store path and the run id; every property reads the store, so a handle from
another process (or an old one) always shows the current state. Must not import ``_launch``.
"""

from __future__ import annotations

import html
import os
import threading
import time
from typing import Any

import duckdb

from nbbatch._errors import InvalidArgument
from nbbatch._events import Status
from nbbatch._store import inputs as store_inputs
from nbbatch._store import reader
from nbbatch._store.control import stop_file

__all__ = ["Run", "list_runs", "open_run"]

DEFAULT_STORE = "nbbatch.duckdb"


def default_store() -> str:
    """``$NBBATCH_STORE`` or ``nbbatch.duckdb`` in the working directory."""
    return os.environ.get("NBBATCH_STORE") or DEFAULT_STORE


class Run:
    """A run in a store: status, counts, reduced metrics and queries over its outputs.

    Example:
        >>> run = nbbatch.open_run("embeddings")                    # doctest: +SKIP
        >>> run.status, run.reduced_metrics                         # doctest: +SKIP
        ('done', {'accuracy': 0.1})
        >>> run.outputs().df().head()                               # doctest: +SKIP
    """

    def __init__(self, store: str, run_id: str, summary: dict[str, Any] | None = None) -> None:
        self.store = os.path.abspath(store)
        self.id = run_id
        self._summary = summary
        # Set by `%batchprocess --background`: the thread running the launcher and its error.
        self._thread: threading.Thread | None = None
        self._failure: list[BaseException] = []

    # -- state ----------------------------------------------------------------------------------
    def refresh(self) -> Run:
        """Re-read the run from the store."""
        with reader.reading(self.store) as con:
            self._summary = reader.run_summary(con, self.id)
        return self

    @property
    def summary(self) -> dict[str, Any]:
        """The run's row plus counts, as a dict (read fresh on each access)."""
        return self.refresh()._summary or {}

    def _get(self, key: str) -> Any:
        return self.summary[key]

    @property
    def name(self) -> str:
        """The run's name (pass it as ``run_name`` to resume)."""
        if self._summary is not None:
            return str(self._summary["name"])
        return str(self._get("name"))

    @property
    def status(self) -> Status:
        """``running``, ``done``, ``failed``, ``preempted`` or ``interrupted``, read fresh.

        A `Status` is a ``str`` (``run.status == "done"`` holds). ``interrupted`` means the run's
        launcher vanished without marking it (SIGKILL, the OOM killer, a dead kernel): the store
        says ``running`` but no process holds its writer lock. Like ``failed`` and ``preempted``,
        it resumes when its name is passed as ``run_name`` again.
        """
        return Status(self._get("status"))

    @property
    def counts(self) -> dict[str, int]:
        """Batch and row counts.

        ``total_batches`` planned; ``done_batches`` processed so far (live, updated about every
        0.5 s, including batches not yet committed); ``committed_batches`` and ``rows`` stored
        exactly once; ``failed_batches`` failing batches of the latest attempt; ``errors`` all
        recorded errors.
        """
        s = self.summary
        return {
            "total_batches": int(s["real_batches"] or 0),
            "done_batches": max(int(s["done_at_start"] or 0) + int(s["live_batches"]), int(s["committed_batches"])),
            "committed_batches": int(s["committed_batches"]),
            "failed_batches": int(s["live_failed"]),
            "rows": int(s["committed_rows"]),
            "errors": int(s["errors"]),
        }

    @property
    def reduced_metrics(self) -> dict[str, Any]:
        """The wrapped reducers' results (over every attempt of the run)."""
        return dict(self._get("reduced_metrics") or {})

    @property
    def output_dir(self) -> str:
        """Folder of ``upload_path`` files (``rank_<r>/`` per worker) and TensorBoard logs."""
        return str(self._get("output_dir"))

    @property
    def error(self) -> str | None:
        """Why the last attempt failed, if it did."""
        value = self._get("error")
        return None if value is None else str(value)

    # -- queries --------------------------------------------------------------------------------
    def outputs(self, inputs: bool = False) -> duckdb.DuckDBPyRelation:
        """Stored outputs, one row per sample, ordered by ``sample_index``.

        Args:
            inputs: for a run over a `TableDataset`, join each output row to its input row:
                ``sample_index``, the input columns, then the output columns. An input column
                named like an output column (``run_id``, ``rank``, ``batch_idx``,
                ``global_batch`` included) becomes ``input_<name>``.

        Raises:
            InvalidArgument: ``inputs=True`` for a run that did not start on a `TableDataset`.

        Example:
            >>> run.outputs(inputs=True).df()                       # doctest: +SKIP
        """
        con = reader.relation_cursor(self.store)
        relation = reader.outputs_relation(con, self.id)
        if not inputs:
            return relation
        joined = store_inputs.joined_sql(con, self.id, relation.sql_query(), list(relation.columns))
        if joined is None:
            raise InvalidArgument(
                f"run {self.name!r} did not start on a TableDataset, so no input rows were kept to join; use "
                f"`outputs()`, or start runs on `nbbatch.TableDataset(...)` to get inputs with outputs"
            )
        return con.sql(joined)

    def metrics(self) -> duckdb.DuckDBPyRelation:
        """``report_metrics`` values, one row per (batch, name)."""
        return reader.metrics_relation(reader.relation_cursor(self.store), self.id)

    def errors(self) -> duckdb.DuckDBPyRelation:
        """Failures with rank, batch_idx, dataset indices and traceback."""
        return reader.errors_relation(reader.relation_cursor(self.store), self.id)

    def batches(self) -> duckdb.DuckDBPyRelation:
        """Committed batches with engine stats (rank, rows, seconds)."""
        con = reader.relation_cursor(self.store)
        return con.sql("SELECT * FROM batches WHERE run_id = $id ORDER BY global_batch", params={"id": self.id})

    def sql(self, query: str, params: dict[str, Any] | None = None) -> duckdb.DuckDBPyRelation:
        """Run SQL on the store; ``outputs`` names this run's outputs table (as a view).

        For a run over a `TableDataset`, ``inputs`` names its input rows (``sample_index`` and the
        input columns), so ``SELECT * FROM inputs JOIN outputs USING (sample_index)`` works.
        """
        con = reader.relation_cursor(self.store)
        con.sql(f"CREATE OR REPLACE TEMP VIEW outputs AS SELECT * FROM ({reader.outputs_relation(con, self.id).sql_query()})")
        rows = store_inputs.inputs_sql(con, self.id)
        if rows is not None:
            con.sql(f"CREATE OR REPLACE TEMP VIEW inputs AS {rows}")
        return con.sql(query, params=params)

    # -- control --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Ask the live run to stop (preempt) at its next checkpoint."""
        with open(stop_file(self.store, self.id), "w") as handle:
            handle.write(str(time.time()))

    def wait(self, timeout: float | None = None, poll: float = 0.5) -> Run:
        """Block until the run leaves ``running`` (or ``timeout`` seconds pass); returns the run.

        It returns for every other status, ``interrupted`` included: a run whose launcher was
        killed is reported ``interrupted`` as soon as the process is gone, so ``wait()`` never
        outlives its launcher by more than ``poll`` seconds. Check `status` afterwards; a run
        that is not ``done`` resumes under its name.

        For a run started in the background by ``%batchprocess --background``, this joins it and
        raises its error (e.g. `WorkerFailed`), as a blocking call would have.

        Raises:
            TimeoutError: the run is still ``running`` after ``timeout`` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"run {self.name!r} still running after {timeout}s")
            if self._failure:
                raise self._failure[0]
            return self
        while self.status is Status.RUNNING:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"run {self.name!r} still running after {timeout}s")
            time.sleep(poll)
        return self

    # -- display --------------------------------------------------------------------------------
    def __repr__(self) -> str:
        try:
            s = self.summary
        except Exception:  # a repr must not raise
            return f"<nbbatch.Run {self.id} (store unavailable)>"
        return (
            f"<nbbatch.Run {s['name']!r} {s['status']}: {s['committed_batches']}/{s['real_batches']} batches, "
            f"{s['committed_rows']} rows, {s['errors']} errors>"
        )

    def _repr_html_(self) -> str:
        """Notebook view: status, counts, duration, throughput, reduced metrics, first 5 outputs."""
        esc = html.escape
        try:
            s = self.summary
        except Exception as exc:  # noqa: BLE001 - a display hook must not raise
            return f"<div><b>nbbatch run</b> <code>{esc(self.id)}</code>: store unavailable ({esc(str(exc))})</div>"
        started, ended = s.get("started_at"), s.get("finished_at") or s.get("updated_at")
        seconds = (ended - started).total_seconds() if started is not None and ended is not None else None
        rows = int(s["committed_rows"] or 0)
        color = {
            Status.DONE: "#2e7d32", Status.FAILED: "#c62828", Status.PREEMPTED: "#ef6c00", Status.INTERRUPTED: "#6a1b9a",
        }.get(s["status"], "#1565c0")
        fields = [
            ("batches", f"{s['committed_batches']}/{s['real_batches']} committed"),
            ("samples", f"{rows:,}"),
            ("errors", f"{s['errors']} recorded" + (f", {s['live_failed']} failed batches" if s["live_failed"] else "")),
            ("workers", f"{s['world_size']} (attempt {s['attempt']})"),
            ("duration", f"{seconds:.1f} s" if seconds is not None else "?"),
            ("throughput", f"{rows / seconds:,.1f} samples/s" if seconds else "?"),
            ("store", self.store),
        ]
        cell = "style='text-align:left;padding:1px 12px 1px 0'"
        table = "".join(f"<tr><th {cell}>{esc(k)}</th><td {cell}>{esc(str(v))}</td></tr>" for k, v in fields)
        metrics = "".join(
            f"<tr><th {cell}>{esc(str(k))}</th><td {cell}><code>{esc(repr(v) if not isinstance(v, str) else v)}</code></td></tr>"
            for k, v in (s["reduced_metrics"] or {}).items()
        )
        error = s.get("error")
        parts = [
            (
                "<div class='nbbatch-run' style='font-family:sans-serif;border:1px solid #ddd;border-radius:6px;"
                "padding:8px;max-width:760px;overflow-x:auto'>"
                f"<b>nbbatch run</b> <code>{esc(str(s['name']))}</code> "
                f"<span style='color:{color};font-weight:bold'>{esc(str(s['status']))}</span>"
            ),
            f"<table>{table}</table>",
            f"<b>reduced metrics</b><table>{metrics}</table>" if metrics else "",
            f"<pre style='color:#c62828;white-space:pre-wrap;max-height:200px;overflow:auto'>{esc(str(error))}</pre>"
            if error else "",
        ]
        if rows:
            try:
                frame = self.outputs().limit(5).df()
                # Long texts or vectors are clipped so the preview stays a few lines high.
                def clip(value: Any) -> str:
                    text = str(value)
                    return text if len(text) <= 60 else text[:59] + "…"

                frame = frame.map(clip)
                parts.append("<b>first outputs</b>" + frame.to_html(index=False, max_cols=12, border=0, escape=True))
            except Exception:  # noqa: BLE001, S110 - the preview is optional (e.g. the store is mid-flush)
                pass
        return "".join(parts) + "</div>"


def open_run(name_or_id: str, store: str | None = None) -> Run:
    """Open a run by name or id.

    Raises:
        RunNotFound: no such run in the store.
        StoreError: the store cannot be read.
    """
    path = store or default_store()
    with reader.reading(path) as con:
        summary = reader.run_summary(con, name_or_id)
    return Run(path, str(summary["run_id"]), summary)


def list_runs(store: str | None = None) -> list[Run]:
    """Every run in the store, newest first."""
    path = store or default_store()
    with reader.reading(path) as con:
        rows = reader.list_runs(con)
    return [Run(path, str(r["run_id"]), r) for r in rows]
