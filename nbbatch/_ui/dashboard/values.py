"""The whole of one long value, on demand: ``GET /nbbatch/value?run=ID&...`` on a served dashboard.

Views show long strings, tracebacks and messages clipped (`views.clip`); their "full value" link
lands here, so a page never embeds a multi-MB value and one click still reaches it. The route
sits behind the same gate as the page (`auth.install`), reads the store read-only and answers
``text/plain``. Must not import Panel, ``_launch``, ``_worker`` or ``_store.writer``.
"""

from __future__ import annotations

import json
from typing import Any

import duckdb
from tornado.web import HTTPError, RequestHandler

from nbbatch._errors import NbbatchError
from nbbatch._store import reader
from nbbatch._store.connection import StoreOpenError, open_store
from nbbatch._store.sql import ident

__all__ = ["PATH", "READ_WAIT_SECONDS", "FullValueHandler", "full_value", "value_url"]

PATH = "/nbbatch/value"
#: Longest a full-value request waits for the run's writer to release the store before answering 503.
READ_WAIT_SECONDS = 5.0
_ERROR_FIELDS = ("message", "traceback")


def value_url(run_id: str) -> str:
    """The base of a run's full-value links; views append ``&column=..&sample=..`` and the like."""
    return f"{PATH}?run={run_id}"


def full_value(con: duckdb.DuckDBPyConnection, run_id: str, query: dict[str, str]) -> str | None:
    """The text one full-value link names, or None when there is no such value.

    ``query`` holds ``column`` and ``sample`` (an output cell), ``error`` and ``field`` (an
    error's message or traceback) or ``field=error`` (the run's failure).
    """
    if "column" in query:
        relation = reader.outputs_relation(con, run_id)
        if query["column"] not in relation.columns:
            return None
        row = con.execute(f"SELECT {ident(query['column'])} FROM ({relation.sql_query()}) WHERE sample_index = ?",
                          [int(query.get("sample", "-1"))]).fetchone()
        return None if row is None else _text(row[0])
    if "error" in query:
        field = query.get("field", "traceback")
        if field not in _ERROR_FIELDS:
            return None
        row = con.execute(f"SELECT {ident(field)} FROM errors WHERE run_id = ? AND rowid = ?",
                          [run_id, int(query["error"])]).fetchone()
        return None if row is None else _text(row[0])
    if query.get("field") == "error":
        row = con.execute("SELECT error FROM runs WHERE run_id = ?", [run_id]).fetchone()
        return None if row is None else _text(row[0])
    return None


def _text(value: Any) -> str:
    if value is None or isinstance(value, str):
        return value or ""
    return json.dumps(value, default=str) if isinstance(value, (list, dict)) else str(value)


class FullValueHandler(RequestHandler):
    """``GET /nbbatch/value``: one whole value as ``text/plain`` (404 when it does not exist)."""

    def initialize(self, store: str) -> None:
        self.store = store

    def get(self) -> None:
        query = {k: self.get_query_argument(k) for k in self.request.query_arguments}
        run_id = query.pop("run", "")
        try:
            with open_store(self.store, write=False, timeout=READ_WAIT_SECONDS) as con:
                text = full_value(con, run_id, query)
        except ValueError:  # a non-numeric sample or error id
            raise HTTPError(400) from None
        except (StoreOpenError, NbbatchError, duckdb.Error) as exc:
            raise HTTPError(503, reason=type(exc).__name__) from None
        if text is None:
            raise HTTPError(404)
        self.set_header("Content-Type", "text/plain; charset=utf-8")
        self.set_header("X-Content-Type-Options", "nosniff")  # user text, never rendered as HTML
        self.finish(text)
