"""SQL identifiers from user data go through `sql.ident`; a scan of the package fails on any other way.

Also the pieces the hostile-name contract tests rely on, on a real DuckDB file: the quoting helper,
the type check of ``ALTER TABLE ... ADD COLUMN``, the outputs table's columns, the run-name rule,
the case rule of output keys, unpicklable outputs and the folder a run writes to.
"""

from __future__ import annotations

import ast
import pathlib
import re
import threading

import duckdb
import numpy as np
import pyarrow as pa
import pytest

import nbbatch
from nbbatch._errors import InvalidArgument, InvalidRunName, StoreError
from nbbatch._store import arrow, columns
from nbbatch._store.schema import KEY_COLUMNS, RUN_NAME_RULE, check_run_name, outputs_folder, run_folder
from nbbatch._store.sql import ident, literal, type_name
from nbbatch._worker.outputs import RESERVED, KeyCase, OutputError, check_picklable, to_columns

pytestmark = pytest.mark.timeout(60)

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "nbbatch"
HOSTILE = ['b" INTEGER; DROP TABLE runs; COMMIT; --', 'he said "hi"', "it's", "select", "a b.c", "ünï", '"', "x\ny"]

# --- the scan ---------------------------------------------------------------------------------
#
# SQL text is any string (f-string, ``+``, ``%``, ``.format``) with an upper-case SQL keyword. What
# may be spliced into it: constants (literals, UPPER_CASE names and lookups in them), the quoting
# helpers' results, SQL fragments named so (``*sql``/``*query``, e.g. ``relation.sql_query()``;
# where they are built is scanned too), functions of the same module whose every return is safe,
# and local names whose every binding is safe. Exception messages are prose, not SQL. A line that
# splices something else on purpose says why with a ``# sql: ...`` comment.

_SQL = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|ALTER|CREATE|DROP|FROM|INTO|TABLE|VIEW|COPY|DESCRIBE|PRAGMA|ATTACH)\b")
_QUOTING = {"ident", "literal", "type_name"}
_FRAGMENT = re.compile(r"(sql|query)$", re.I)
_CONSTANT = re.compile(r"_?[A-Z][A-Z0-9_]*$")


def _name_of(node: ast.AST) -> str | None:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Call):
        return _name_of(node.func)
    return None


class _Scan:
    """Finds SQL text that splices in anything but quoted names, constants and SQL fragments."""

    def __init__(self, source: str) -> None:
        self.tree = ast.parse(source)
        self.lines = source.splitlines()
        self.parent: dict[ast.AST, ast.AST] = {}
        self.functions: dict[str, ast.AST] = {}
        for node in ast.walk(self.tree):
            for child in ast.iter_child_nodes(node):
                self.parent[child] = node
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.functions.setdefault(node.name, node)
        self.problems: list[tuple[int, str]] = []
        self._checking: set[str] = set()

    def _scope(self, node: ast.AST) -> ast.AST:
        while node in self.parent:
            node = self.parent[node]
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                return node
        return self.tree

    def _bindings(self, name: str, scope: ast.AST) -> list[ast.expr] | None:
        """Every value bound to ``name`` in ``scope``; None if it is a parameter or a loop variable."""
        if isinstance(scope, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            args = scope.args
            if name in {a.arg for a in [*args.posonlyargs, *args.args, *args.kwonlyargs]}:
                return None
        values: list[ast.expr] = []
        for node in ast.walk(scope):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
                values.append(node.value)
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and isinstance(node.target, ast.Name):
                if node.target.id == name and node.value is not None:
                    values.append(node.value)
            elif isinstance(node, (ast.For, ast.comprehension)) and any(
                isinstance(t, ast.Name) and t.id == name for t in ast.walk(node.target)
            ):
                return None
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("append", "extend", "insert")
                  and isinstance(node.func.value, ast.Name) and node.func.value.id == name):
                values.extend(node.args[-1:])
        return values

    def safe(self, node: ast.expr, depth: int = 0) -> bool:
        if depth > 12:
            return False
        name = _name_of(node)
        if isinstance(node, ast.Constant):
            return True
        if isinstance(node, (ast.Name, ast.Attribute)) and name and (_CONSTANT.match(name) or _FRAGMENT.search(name)):
            return True
        if isinstance(node, ast.Subscript):
            return self.safe(node.value, depth + 1)
        if isinstance(node, ast.JoinedStr):
            return all(self.safe(v.value, depth + 1) for v in node.values if isinstance(v, ast.FormattedValue))
        if isinstance(node, ast.IfExp):
            return self.safe(node.body, depth + 1) and self.safe(node.orelse, depth + 1)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return self.safe(node.left, depth + 1) and self.safe(node.right, depth + 1)
        if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
            return all(self.safe(e, depth + 1) for e in node.elts)
        if isinstance(node, ast.Starred):
            return self.safe(node.value, depth + 1)
        if isinstance(node, (ast.GeneratorExp, ast.ListComp)):
            return self.safe(node.elt, depth + 1)
        if isinstance(node, ast.Call):
            if name in _QUOTING or (name and _FRAGMENT.search(name)):
                return True
            if name in ("join", "get") and isinstance(node.func, ast.Attribute):
                target = node.args[0] if name == "join" and node.args else node.func.value
                return self.safe(target, depth + 1)
            if name in ("sorted", "list", "tuple") and node.args:
                return self.safe(node.args[0], depth + 1)
            return self._returns_safe(name, depth)
        if isinstance(node, ast.Name):
            values = self._bindings(node.id, self._scope(node))
            return bool(values) and all(self.safe(v, depth + 1) for v in values or ())
        return False

    def _returns_safe(self, name: str | None, depth: int) -> bool:
        """A function of this module whose every ``return`` is safe (its SQL is scanned where built)."""
        func = self.functions.get(name or "")
        if func is None or name in self._checking:
            return False
        self._checking.add(name or "")
        try:
            returns = [n.value for n in ast.walk(func) if isinstance(n, ast.Return) and n.value is not None]
            return bool(returns) and all(self.safe(r, depth + 1) for r in returns)
        finally:
            self._checking.discard(name or "")

    def _prose(self, node: ast.AST) -> bool:
        """An exception message, or a line that says why it splices SQL (``# sql: ...``)."""
        line = self.lines[node.lineno - 1] if 0 < getattr(node, "lineno", 0) <= len(self.lines) else ""
        if "# sql:" in line:
            return True
        while node in self.parent:
            up = self.parent[node]
            if isinstance(up, ast.Raise):
                return True
            if isinstance(up, ast.Call) and node in up.args and (_name_of(up) or "a")[:1].isupper():
                return True
            if isinstance(up, ast.stmt):
                return False
            node = up
        return False

    def _check(self, node: ast.AST, text: str, parts: list[ast.expr]) -> None:
        if not _SQL.search(text) or self._prose(node):
            return
        for part in parts:
            if not self.safe(part):
                self.problems.append((getattr(node, "lineno", 0), ast.unparse(part)))

    def run(self) -> list[tuple[int, str]]:
        for node in ast.walk(self.tree):
            if isinstance(node, ast.JoinedStr) and not isinstance(self.parent.get(node), ast.FormattedValue):
                texts = [v.value for v in node.values if isinstance(v, ast.Constant) and isinstance(v.value, str)]
                values = [v.value for v in node.values if isinstance(v, ast.FormattedValue)]
                self._check(node, "".join(texts), values)
                for before, after in zip(node.values, node.values[1:]):
                    # A hand-made quote around a value (`"{name}"`): the bug this test exists for.
                    if (isinstance(before, ast.Constant) and str(before.value).endswith('"')
                            and isinstance(after, ast.FormattedValue) and _SQL.search("".join(texts))):
                        self.problems.append((node.lineno, 'a hand-quoted "{...}"'))
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mod) and isinstance(node.left, ast.Constant):
                self._check(node, str(node.left.value), [node.right])
            elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add) and not (
                isinstance(self.parent.get(node), ast.BinOp) and isinstance(self.parent[node].op, ast.Add)  # type: ignore[attr-defined]
            ):
                operands, stack = [], [node]
                while stack:
                    item = stack.pop()
                    if isinstance(item, ast.BinOp) and isinstance(item.op, ast.Add):
                        stack += [item.left, item.right]
                    else:
                        operands.append(item)
                text = " ".join(str(o.value) for o in operands if isinstance(o, ast.Constant))
                self._check(node, text, [o for o in operands if not isinstance(o, (ast.Constant, ast.JoinedStr))])
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format"
                  and isinstance(node.func.value, ast.Constant)):
                self._check(node, str(node.func.value.value), [*node.args, *(k.value for k in node.keywords)])
        return self.problems


def scan(source: str) -> list[tuple[int, str]]:
    return _Scan(source).run()


def test_the_package_builds_sql_identifiers_only_through_ident() -> None:
    problems = {
        f"{path.relative_to(PACKAGE.parent)}:{line}: {what}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for line, what in scan(path.read_text())
    }
    assert not problems, "SQL text built from unquoted values; wrap names in `nbbatch._store.sql.ident`:\n" + "\n".join(
        sorted(problems)
    )


@pytest.mark.parametrize(
    "source",
    [
        'con.execute(f\'ALTER TABLE {table} ADD COLUMN "{name}" {kind}\')',  # the original bug
        'con.execute(f"SELECT {column} FROM t")',
        'con.execute("SELECT * FROM " + table)',
        'con.execute("SELECT * FROM %s" % table)',
        'con.execute("SELECT * FROM {}".format(table))',
        'q = ", ".join(\'"\' + c + \'"\' for c in cols)\ncon.execute(f"SELECT {q} FROM t")',
        'con.execute(f\'SELECT "{ident(c)}" FROM t\')',
    ],
)
def test_the_scan_catches_identifiers_built_by_hand(source: str) -> None:
    assert scan(source), source


@pytest.mark.parametrize(
    "source",
    [
        'con.execute(f"SELECT {ident(c)} FROM {ident(t)} WHERE x = ?", [v])',
        'q = ", ".join(ident(c) for c in cols)\ncon.execute(f"SELECT {q} FROM t")',
        'o = "FORMAT csv" if csv else "FORMAT json"\ncon.execute(f"COPY ({rel.sql_query()}) TO {literal(p)} ({o})")',
        'raise ValueError(f"the table {name} is missing")',  # prose, not SQL
    ],
)
def test_the_scan_accepts_quoted_identifiers(source: str) -> None:
    assert not scan(source), source


# --- quoting ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", HOSTILE)
def test_ident_round_trips_any_name_as_a_column(name: str) -> None:
    con = duckdb.connect()
    con.execute(f"CREATE TABLE {ident('t; DROP')} ({ident(name)} INTEGER, keep INTEGER)")
    con.execute(f"INSERT INTO {ident('t; DROP')} VALUES (1, 2)")
    cur = con.execute(f"SELECT {ident(name)} FROM {ident('t; DROP')}")
    assert cur.fetchall() == [(1,)] and cur.description[0][0] == name


def test_ident_and_literal_refuse_what_no_engine_stores() -> None:
    assert ident('a"b') == '"a""b"' and literal("it's") == "'it''s'"
    for bad in ("", "a\x00b"):
        with pytest.raises(ValueError):
            ident(bad)
    with pytest.raises(TypeError):
        ident(3)  # type: ignore[arg-type]


def test_type_name_accepts_duckdb_types_only() -> None:
    con = duckdb.connect()
    for good in ("BIGINT", "FLOAT[8]", 'STRUCT("x""y; DROP" BIGINT, "B C" BIGINT)', "VARCHAR[]"):
        assert type_name(con, good) == good
    for bad in ("INTEGER; DROP TABLE runs", "INTEGER DEFAULT 1", "INT"):  # INT reads back as INTEGER
        with pytest.raises(ValueError):
            type_name(con, bad)


# --- the outputs table on a real DuckDB file --------------------------------------------------


def _rows(keys: dict[str, list[int]], first: int = 0, rank: int = 0) -> tuple[int, int, int, int, dict[str, object]]:
    return (rank, first, first, first, {k: np.array(v) for k, v in keys.items()})


def test_hostile_keys_in_the_first_and_a_later_flush(tmp_path: pathlib.Path) -> None:
    con = duckdb.connect(str(tmp_path / "s.duckdb"))
    con.execute("CREATE TABLE runs (x INTEGER)")
    a, b = HOSTILE[0], HOSTILE[1]
    columns.insert_outputs(con, "ab12", arrow.outputs_table("ab12", [_rows({a: [1]})]))
    # Later flush: a key new to the table (ALTER TABLE ... ADD COLUMN), and one missing in an earlier batch.
    columns.insert_outputs(con, "ab12", arrow.outputs_table("ab12", [_rows({a: [2]}, 1), _rows({a: [3], b: [4]}, 2)]))
    assert columns.output_columns(con, "ab12") == (*KEY_COLUMNS, a, b)
    rows = con.execute(f"SELECT {ident(a)}, {ident(b)} FROM {ident('outputs_ab12')} ORDER BY sample_index").fetchall()
    assert rows == [(1, None), (2, None), (3, 4)]
    assert con.execute("SELECT count(*) FROM runs").fetchall() == [(0,)]  # still there


@pytest.mark.parametrize("stored,new", [(["x"], ["X"]), ([], ["x", "X"]), ([], ["Sample_Index"])])
def test_keys_equal_ignoring_case_are_refused_at_commit(tmp_path: pathlib.Path, stored: list[str], new: list[str]) -> None:
    con = duckdb.connect(str(tmp_path / "s.duckdb"))
    if stored:
        columns.insert_outputs(con, "ab12", arrow.outputs_table("ab12", [_rows({k: [1] for k in stored})]))
    batches = [_rows({k: [1]}, i) for i, k in enumerate(new)]
    with pytest.raises(StoreError, match=f"output key '{new[-1]}' equals the column") as info:
        columns.insert_outputs(con, "ab12", arrow.outputs_table("ab12", batches))
    assert repr(new[-1]) in str(info.value)


def test_case_clash_names_both_keys() -> None:
    assert columns.case_clash(["a", "A"], ()) == ("A", "a")
    assert columns.case_clash(["RANK"], ()) == ("RANK", "rank")
    assert columns.case_clash(["b"], ("run_id", "B")) == ("b", "B")
    assert columns.case_clash(["b", "c"], ("b",)) is None


# --- workers: key case and unpicklable values -------------------------------------------------


def test_reserved_names_agree() -> None:
    assert RESERVED == set(KEY_COLUMNS)


@pytest.mark.parametrize(
    "value,stored,text",
    [
        ({"x": [1], "X": [2]}, (), "output key 'X' equals 'x' \\(another output key of this run\\) ignoring case"),
        ({"Sample_Index": [1]}, (), "'Sample_Index' equals 'sample_index' \\(a column every row carries\\)"),
        ({"Score": [1]}, ("score",), "'Score' equals 'score'"),
    ],
)
def test_key_case_is_a_batch_error(value: dict[str, list[int]], stored: tuple[str, ...], text: str) -> None:
    with pytest.raises(OutputError, match=text):
        to_columns(value, 1, KeyCase(stored))


def test_key_case_remembers_only_batches_that_passed() -> None:
    keys = KeyCase()
    with pytest.raises(OutputError):
        to_columns({"x": [1, 2]}, 1, keys)  # wrong length: this batch fails, `x` is not remembered
    keys.add(list(to_columns({"X": [1]}, 1, keys) or {}))
    with pytest.raises(OutputError, match="'x' equals 'X'"):
        to_columns({"x": [1]}, 1, keys)


def test_an_unpicklable_value_is_the_batchs_error() -> None:
    # Checked once, where the batch is sent (the loop), not in `to_columns`.
    with pytest.raises(OutputError, match="output 'handle' holds a value that cannot be pickled") as info:
        check_picklable(to_columns({"ok": [1], "handle": [threading.Lock()]}, 1) or {})
    assert "`str(x)`" in str(info.value)
    with pytest.raises(OutputError, match="cannot be pickled"):
        check_picklable(to_columns({"obj": np.array([threading.Lock()], dtype=object)}, 1) or {})


# --- run names and folders --------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "run-1", "nightly_2024.01", "A.b-c_d", "0", "_x", "x" * 300])
def test_safe_run_names(name: str) -> None:
    assert check_run_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "-x", "--help", ".hidden", "..", "../../x", "/abs", "a/b", "a b", "a\nb", "é", "a;b", "a\x00", "x\n"]
)
def test_unsafe_run_names_give_the_rule(name: str) -> None:
    with pytest.raises(InvalidRunName) as info:
        check_run_name(name)
    assert isinstance(info.value, InvalidArgument) and isinstance(info.value, ValueError)
    assert RUN_NAME_RULE in str(info.value) and repr(name) in str(info.value)
    assert nbbatch.InvalidRunName is InvalidRunName


def test_run_folders_stay_inside_the_store_folder(tmp_path: pathlib.Path) -> None:
    root = outputs_folder(str(tmp_path / "my.store.duckdb"))
    assert root == str(tmp_path / "my.store_outputs")
    assert run_folder(root, "ab12") == str(tmp_path / "my.store_outputs" / "ab12")
    old = str(tmp_path / "my.store_outputs" / "nightly")  # an older nbbatch named folders by run name
    assert run_folder(root, "ab12", old) == old
    for planted in ("/etc", str(tmp_path), root, root + "/../x", root + "-evil/x"):
        assert run_folder(root, "ab12", planted) == str(tmp_path / "my.store_outputs" / "ab12"), planted
    with pytest.raises(ValueError):
        run_folder(root, "../x")


def test_null_chunks_take_the_columns_type() -> None:
    table = arrow.outputs_table("r", [_rows({"a": [1]}), (0, 1, 1, 1, {"b": [None]}), (0, 2, 2, 2, {"b": np.ones((1, 2))})])
    assert table.column("b").type == pa.list_(pa.float64(), 2) and table.column("a").to_pylist() == [1, None, None]
