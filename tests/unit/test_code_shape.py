"""The package's shape rules (issue 10): short functions, few parameters, private parts kept private.

Functions in ``nbbatch/`` stay under ``MAX_LINES`` lines and ``MAX_PARAMS`` parameters (``self``
and ``cls`` not counted); the exceptions are listed with their reason. No module imports another
module's private name (``from nbbatch.x import _y``).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nbbatch"
MAX_LINES = 50
MAX_PARAMS = 6

# "module:function" -> why it is longer or takes more parameters.
EXCEPTIONS: dict[str, str] = {
    "_api:torch_batch_process": (
        "Determined's public signature plus nbbatch's documented keyword options; most of its lines are "
        "the docstring"
    ),
    "_errors:__init__": (
        "`WorkerFailed`'s public attributes (rank, batch_idx, global_batch, indices, traceback, run_name), "
        "keyword-only, as users catch and read them"
    ),
}


def _functions() -> list[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((f"{module}:{node.name}", node))
    return found


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of the function, its docstring not counted."""
    body = node.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        if len(body) == 1:
            return 1
        first = body[1]
    return (node.end_lineno or node.lineno) - first.lineno + 1


def _params(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = node.args
    names = [p.arg for p in a.posonlyargs + a.args + a.kwonlyargs]
    return len([n for n in names if n not in ("self", "cls")])


def test_functions_are_short_and_take_few_parameters() -> None:
    too_long = []
    for name, node in _functions():
        if name in EXCEPTIONS:
            continue
        lines, params = _code_lines(node), _params(node)
        if lines > MAX_LINES or params > MAX_PARAMS:
            too_long.append(f"{name}: {lines} lines, {params} parameters")
    assert not too_long, "split these (or list them in EXCEPTIONS with the reason):\n" + "\n".join(too_long)


def test_exceptions_are_still_needed() -> None:
    names = {name for name, _ in _functions()}
    assert not set(EXCEPTIONS) - names, "remove exceptions for functions that no longer exist"


def test_no_private_name_is_imported_across_modules() -> None:
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nbbatch"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        offenders.append(f"{path.relative_to(PACKAGE)}: from {node.module} import {alias.name}")
    assert not offenders, "private names used across modules:\n" + "\n".join(offenders)
