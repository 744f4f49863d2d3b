"""No import cycle between the modules of ``bsprof/``, read statically from the source files.

Every ``import bsprof...`` / ``from bsprof... import`` / relative import is an edge, at module level or inside a
function (a function-level import still runs, and hiding a cycle in a function is how ``cli`` <-> ``commands``
once crept in). Imports under ``if TYPE_CHECKING:`` are not edges: they never run (annotations are strings under
``from __future__ import annotations``). An edge goes to the deepest module named (``from bsprof.engine import
trial`` -> ``bsprof.engine.trial``; ``from bsprof.engine.trial import X`` -> ``bsprof.engine.trial``), not to the
parent packages Python initialises on the way.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bsprof"


def module_files(package: Path) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (source file, is a package ``__init__``)."""
    modules = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        modules[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return modules


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    return skipped


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports at run time (see the module docstring for what counts)."""
    modules = module_files(package)

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        skipped = _type_checking_nodes(tree)
        targets: set[str | None] = set()
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            if isinstance(node, ast.Import):
                targets.update(owner(alias.name) for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".") if is_package else name.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    source = ".".join([*base, *([node.module] if node.module else [])])
                else:
                    source = node.module or ""
                targets.update(owner(f"{source}.{alias.name}") or owner(source) for alias in node.names)
        graph[name] = {t for t in targets if t is not None and t != name}
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module, as ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan's algorithm; the package is small enough for recursion
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    start = min(component)
    paths = {start: [start]}
    frontier = [start]
    while frontier:  # breadth-first from start back to start, inside the component
        v = frontier.pop(0)
        for w in sorted(graph[v] & component):
            if w == start:
                return [*paths[v], start]
            if w not in paths:
                paths[w] = [*paths[v], w]
                frontier.append(w)
    raise AssertionError(f"no cycle through {start}")  # a strongly connected component always has one


def test_bsprof_has_no_import_cycle() -> None:
    cycles = find_cycles(import_graph(PACKAGE))
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_the_graph_sees_every_kind_of_import(tmp_path: Path) -> None:
    pkg = tmp_path / "bsprof"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "",
        "a.py": "from bsprof.b import x\n",
        "b.py": "def f():\n    from . import c\n",
        "c.py": "import bsprof.sub.d\n",
        "sub/__init__.py": "from .d import y\n",
        "sub/d.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from bsprof import a\nfrom .. import e\n",
        "e.py": "import os\n",
    }
    for rel, text in files.items():
        (pkg / rel).write_text(text, encoding="utf-8")
    graph = import_graph(pkg)
    assert graph == {
        "bsprof": set(),
        "bsprof.a": {"bsprof.b"},
        "bsprof.b": {"bsprof.c"},
        "bsprof.c": {"bsprof.sub.d"},
        "bsprof.sub": {"bsprof.sub.d"},
        "bsprof.sub.d": {"bsprof.e"},
        "bsprof.e": set(),
    }
    assert find_cycles(graph) == []
    (pkg / "e.py").write_text("def g():\n    from bsprof.a import z\n", encoding="utf-8")
    assert find_cycles(import_graph(pkg)) == [
        ["bsprof.a", "bsprof.b", "bsprof.c", "bsprof.sub.d", "bsprof.e", "bsprof.a"]
    ]


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"x": {"y"}, "y": {"x"}}, [["x", "y", "x"]]),
        ({"x": {"y"}, "y": {"z"}, "z": set()}, []),
        ({"x": {"y"}, "y": {"z"}, "z": {"y"}, "w": {"w"}}, [["y", "z", "y"]]),
    ],
)
def test_find_cycles(graph: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert find_cycles(graph) == expected


def test_no_test_module_imports_conftest() -> None:
    """pytest loads ``conftest.py`` itself; a second import as a module runs it twice. Helpers live in helpers.py."""
    tests = Path(__file__).resolve().parent
    importers = []
    for path in sorted(tests.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if "conftest" in names or (isinstance(node, ast.ImportFrom) and node.module == "conftest"):
                importers.append(path.name)
    assert importers == []
