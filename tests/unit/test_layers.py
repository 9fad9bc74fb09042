"""Imports only go down the flow drawn in docs/ARCHITECTURE.md; `import nbbatch` stays light."""

from __future__ import annotations

import ast
import pathlib
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "nbbatch"
ARCHITECTURE = PACKAGE.parent / "docs" / "ARCHITECTURE.md"

# module prefix -> nbbatch modules it must not import
FORBIDDEN = {
    "nbbatch._store": ("nbbatch._launch", "nbbatch._worker", "nbbatch._ui", "nbbatch._api", "nbbatch._run", "nbbatch._processor"),
    "nbbatch._worker": ("nbbatch._store", "nbbatch._launch", "nbbatch._ui", "nbbatch._api", "nbbatch._run"),
    "nbbatch._plan": ("nbbatch.",),
    "nbbatch._events": ("nbbatch.",),
    "nbbatch._rows": ("nbbatch.",),
    "nbbatch._errors": ("nbbatch.",),
    "nbbatch._progress": ("nbbatch._store", "nbbatch._launch", "nbbatch._worker", "nbbatch._ui", "nbbatch._api"),
    "nbbatch._processor": ("nbbatch._store", "nbbatch._launch", "nbbatch._ui", "nbbatch._api", "nbbatch._run"),
    "nbbatch._run": ("nbbatch._launch", "nbbatch._worker", "nbbatch._ui", "nbbatch._api"),
    "nbbatch._launch": ("nbbatch._ui", "nbbatch._api"),
    "nbbatch._table": ("nbbatch._launch", "nbbatch._worker", "nbbatch._ui", "nbbatch._api", "nbbatch._run"),
    "nbbatch._ui": ("nbbatch._launch", "nbbatch._worker", "nbbatch._store.writer"),
    "nbbatch._options": ("nbbatch._store", "nbbatch._launch", "nbbatch._worker", "nbbatch._ui", "nbbatch._api", "nbbatch._run",
                         "nbbatch._processor", "nbbatch._progress", "nbbatch._table", "nbbatch._plan", "nbbatch._rows"),
}


def _modules() -> list[tuple[str, pathlib.Path]]:
    out = []
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("module,path", _modules(), ids=[m for m, _ in _modules()])
def test_imports_follow_the_flow(module: str, path: pathlib.Path) -> None:
    for prefix, banned in FORBIDDEN.items():
        if module == prefix or module.startswith(prefix + "."):
            bad = sorted(i for i in _imports(path) if any(i == b.rstrip(".") or i.startswith(b if b.endswith(".") else b + ".") or i == b for b in banned))
            assert not bad, f"{module} imports {bad}, against the flow in docs/ARCHITECTURE.md"


def test_options_use_only_errors_and_events() -> None:
    """The run options sit under every layer that reads them (`_store`, `_launch`, `_api`, `_ui`)."""
    used = {name for name in _imports(PACKAGE / "_options.py") if name == "nbbatch" or name.startswith("nbbatch.")}
    assert used <= {"nbbatch._errors", "nbbatch._events"}, f"_options imports {sorted(used)}"


def _documented_rule() -> dict[str, set[str]]:
    """The layer rule as docs/ARCHITECTURE.md states it, in the form of `FORBIDDEN`.

    Each bullet of its "The layer rule" section that starts with a module names it, then (before any
    ``:``) the modules it must not import; "import nothing from nbbatch" bans every nbbatch module.
    """
    section = ARCHITECTURE.read_text().split("## The layer rule", 1)[1].split("\n## ", 1)[0]
    bullets = [" ".join(b.split()) for b in re.split(r"\n- ", section)[1:]]
    rule: dict[str, set[str]] = {}
    for bullet in bullets:
        if not bullet.startswith("`_"):
            continue  # a bullet about something else (`import nbbatch` staying light)
        names = [f"nbbatch.{n}" for n in re.findall(r"`(_[\w.]+)`", bullet.split(":", 1)[0])]
        if "import nothing from nbbatch" in bullet:
            rule.update({name: {"nbbatch."} for name in names})
        else:
            rule[names[0]] = set(names[1:])
    return rule


def test_the_architecture_page_states_this_rule() -> None:
    assert _documented_rule() == {k: set(v) for k, v in FORBIDDEN.items()}, "update the layer rule in docs/ARCHITECTURE.md together with FORBIDDEN"


@pytest.mark.parametrize("module,path", _modules(), ids=[m for m, _ in _modules()])
def test_modules_stay_small(module: str, path: pathlib.Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= 400, f"{module} has {lines} lines; split it by responsibility (docs/ARCHITECTURE.md: under 400)"


def test_import_is_lazy() -> None:
    code = "import sys, nbbatch; print(int('torch' in sys.modules), int('panel' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["0", "0"], "import nbbatch must not import torch or panel"
