"""The Run handle: a view of one run in the store, returned by `torch_batch_process`.

It holds only the store path and the run id; every property reads the store, so a handle from
another process (or an old one) always shows the current state. `batch_counts` is the one reading
of a summary's counts (the dashboard uses it too), and the notebook view takes its colours and
fraction done from ``_progress``, as the widget and the dashboard do. Must not import ``_launch``
or ``_ui``.
"""

from __future__ import annotations

import html
import os
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import duckdb

from nbbatch._errors import InvalidArgument
from nbbatch._events import Status
from nbbatch._progress import fraction_done, status_color
from nbbatch._store import inputs as store_inputs
from nbbatch._store import reader
from nbbatch._store.control import stop_file

__all__ = ["Run", "batch_counts", "list_runs", "open_run"]

DEFAULT_STORE = "nbbatch.duckdb"
#: Seconds between two reads of the store while `Run.wait` waits for a run of another process.
WAIT_POLL_SECONDS = 0.5
#: The notebook view previews this many output rows, of at most this many columns and characters each.
PREVIEW_ROWS = 5
PREVIEW_COLUMNS = 12
PREVIEW_CHARS = 60


def default_store() -> str:
    """``$NBBATCH_STORE`` or ``nbbatch.duckdb`` in the working directory."""
    return os.environ.get("NBBATCH_STORE") or DEFAULT_STORE


def batch_counts(summary: Mapping[str, Any]) -> dict[str, int]:
    """A run summary's batch and row counts, as `Run.counts` describes them.

    ``done_batches`` is the live count (batches done before this attempt plus those done in it)
    or the committed count, whichever is ahead: live counters lag a checkpoint only briefly, and
    a finished attempt's counters are gone from a resumed run.

    Args:
        summary: a row of ``reader.run_summary`` or ``reader.list_runs``.
    """
    committed = int(summary["committed_batches"] or 0)
    return {
        "total_batches": int(summary["real_batches"] or 0),
        "done_batches": max(int(summary["done_at_start"] or 0) + int(summary["live_batches"] or 0), committed),
        "committed_batches": committed,
        "failed_batches": int(summary["live_failed"] or 0),
        "rows": int(summary["committed_rows"] or 0),
        "errors": int(summary["errors"] or 0),
    }


def _fraction(counts: Mapping[str, int]) -> float:
    return fraction_done(counts["done_batches"], counts["failed_batches"], counts["total_batches"])


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
        # See `attach_background`: the thread of this process that runs the launcher, and its error.
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
        return batch_counts(self.summary)

    @property
    def fraction_done(self) -> float:
        """Share of planned batches processed, failed (skipped) ones included, read fresh.

        The number every progress display shows (widget, dashboard, the CLI's bar); 1.0 once a
        run ended ``done``, even with skipped batches.
        """
        return _fraction(self.counts)

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

    def attach_background(self, thread: threading.Thread, failures: list[BaseException]) -> None:
        """Tie this handle to the thread of this process that runs its launcher (for nbbatch's own use).

        ``%batchprocess --background`` calls it: from then on `wait` joins ``thread`` and raises
        the first error in ``failures``, the list the thread appends the run's error to, as a
        blocking call would have raised it.

        Args:
            thread: the thread running `torch_batch_process` for this run.
            failures: filled by that thread when the run raises; read when it ends.
        """
        self._thread = thread
        self._failure = failures

    @property
    def running_in_background(self) -> bool:
        """Whether a thread attached with `attach_background` still runs this run's launcher."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self, timeout: float | None = None, poll: float = WAIT_POLL_SECONDS) -> Run:
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
        counts = batch_counts(s)
        return (
            f"<nbbatch.Run {s['name']!r} {s['status']}: {100 * _fraction(counts):.0f}% done, "
            f"{counts['committed_batches']}/{counts['total_batches']} batches committed, {counts['rows']} rows, "
            f"{counts['errors']} errors>"
        )

    def _repr_html_(self) -> str:
        """Notebook view: status, counts, duration, throughput, reduced metrics, first outputs."""
        try:
            s = self.summary
        except Exception as exc:  # noqa: BLE001 - a display hook must not raise
            return (f"<div><b>nbbatch run</b> <code>{html.escape(self.id)}</code>: store unavailable "
                    f"({html.escape(str(exc))})</div>")
        error = s.get("error")
        status = str(s["status"])
        parts = [
            (
                "<div class='nbbatch-run' style='font-family:sans-serif;border:1px solid #ddd;border-radius:6px;"
                "padding:8px;max-width:760px;overflow-x:auto'>"
                f"<b>nbbatch run</b> <code>{html.escape(str(s['name']))}</code> "
                f"<span style='color:{status_color(status)};font-weight:bold'>{html.escape(status)}</span>"
            ),
            f"<table>{_html_rows(_summary_fields(s, self.store))}</table>",
        ]
        metrics = _html_rows((str(k), v if isinstance(v, str) else repr(v), True)
                             for k, v in (s["reduced_metrics"] or {}).items())
        if metrics:
            parts.append(f"<b>reduced metrics</b><table>{metrics}</table>")
        if error:
            parts.append(f"<pre style='color:{status_color(Status.FAILED)};white-space:pre-wrap;max-height:200px;"
                         f"overflow:auto'>{html.escape(str(error))}</pre>")
        if batch_counts(s)["rows"]:
            parts.append(self._outputs_preview())
        return "".join(parts) + "</div>"

    def _outputs_preview(self) -> str:
        """The first outputs as an HTML table; empty when they cannot be read now."""
        try:
            frame = self.outputs().limit(PREVIEW_ROWS).df()
            # Long texts or vectors are clipped so the preview stays a few lines high.
            frame = frame.map(_clip)
            table = frame.to_html(index=False, max_cols=PREVIEW_COLUMNS, border=0, escape=True)
            return f"<b>first outputs</b>{table}"
        except Exception:  # noqa: BLE001 - the preview is optional (e.g. the store is mid-flush)
            return ""


_CELL = "style='text-align:left;padding:1px 12px 1px 0'"


def _summary_fields(s: Mapping[str, Any], store: str) -> list[tuple[str, str, bool]]:
    """The notebook view's ``(name, value, as code)`` rows: counts, fraction done, duration, throughput."""
    counts = batch_counts(s)
    started, ended = s.get("started_at"), s.get("finished_at") or s.get("updated_at")
    seconds = (ended - started).total_seconds() if started is not None and ended is not None else None
    failed = f", {counts['failed_batches']} failed batches" if counts["failed_batches"] else ""
    return [
        ("batches", f"{counts['committed_batches']}/{counts['total_batches']} committed, "
                    f"{100 * _fraction(counts):.0f}% done", False),
        ("samples", f"{counts['rows']:,}", False),
        ("errors", f"{counts['errors']} recorded{failed}", False),
        ("workers", f"{s['world_size']} (attempt {s['attempt']})", False),
        ("duration", f"{seconds:.1f} s" if seconds is not None else "?", False),
        ("throughput", f"{counts['rows'] / seconds:,.1f} samples/s" if seconds else "?", False),
        ("store", store, False),
    ]


def _html_rows(fields: Iterable[tuple[str, str, bool]]) -> str:
    """``(name, value, as code)`` triples as escaped table rows."""
    out = []
    for name, value, code in fields:
        shown = f"<code>{html.escape(value)}</code>" if code else html.escape(value)
        out.append(f"<tr><th {_CELL}>{html.escape(name)}</th><td {_CELL}>{shown}</td></tr>")
    return "".join(out)


def _clip(value: Any) -> str:
    text = str(value)
    return text if len(text) <= PREVIEW_CHARS else text[:PREVIEW_CHARS - 1] + "…"


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
