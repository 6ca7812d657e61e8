"""serve/ imports one way: each module imports alone (in a fresh interpreter,
so nothing imported earlier hides a cycle), and the graph of imports between
serve's modules has no cycle (app -> routers -> deps -> services ...)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import tallow.serve

SERVE = Path(tallow.serve.__file__).parent
MODULES = sorted(p.stem for p in SERVE.glob("*.py") if p.stem != "__init__")


def _serve_imports(module: str) -> set[str]:
    """The serve modules ``module`` imports (at any depth in the file: lazy imports count too)."""
    tree = ast.parse((SERVE / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("tallow.serve."):
            out.add(node.module.split(".")[2])
    return out & set(MODULES)


def test_serve_import_graph_has_no_cycle():
    graph = {m: _serve_imports(m) for m in MODULES}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle in tallow.serve: " + " -> ".join(path + [m, n]))
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in MODULES:
        if m not in state:
            visit(m, [])
    assert "app" not in set().union(*(graph[m] for m in MODULES if m != "app")), \
        "only the package's __init__ imports app: routers take shared helpers from deps"


@pytest.mark.parametrize("module", MODULES)
def test_each_serve_module_imports_alone(module):
    code = f"import importlib; importlib.import_module('tallow.serve.{module}')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
