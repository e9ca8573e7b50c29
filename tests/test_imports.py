"""No import cycles in d2nwg (``d2nwg/`` and ``kernels/``, installed as ``d2nwg.kernels``).

The graph is built from the source with :mod:`ast`, without importing anything. Its rules:

* Every ``import`` statement counts, wherever it is: at module level, inside a function or a
  method, under ``try``/``if``. An import moved into a function only defers the cycle to the
  first call; it is still a cycle. (The one exception: imports under ``if TYPE_CHECKING:``,
  which never run.)
* ``import a.b.c`` is an edge to module ``a.b.c``. ``from a.b import c`` is an edge to
  ``a.b.c`` when that is a module, else to ``a.b`` (``c`` is a name defined there); ``from
  a.b import *`` is an edge to ``a.b``. Relative imports are resolved against the importing
  module's package. A name that is not a module of the package resolves to its longest prefix
  that is one; imports of other distributions (torch, triton, ...) are no edges.
* An edge to a package is an edge to its ``__init__``. Importing ``a.b.c`` also runs
  ``a/__init__`` and ``a/b/__init__`` first, but that is no edge: Python runs a package's
  ``__init__`` before any of its submodules whoever imports them, and a package's
  ``__init__`` importing its own submodules (re-exporting their names) is the normal shape of
  a package. What closes a cycle there is a submodule importing its package's ``__init__``
  back (``from d2nwg import ops`` or ``import d2nwg`` inside ``d2nwg/ops/x.py``): then the
  ``__init__`` and the submodule depend on each other.

A cycle is a strongly connected component of more than one module (a module importing itself
is none); the failure names one cycle of each component, and every import edge inside it with
its file and line.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Import name of a package -> its source folder (kernels/ is installed as d2nwg.kernels).
PACKAGES = {"d2nwg": ROOT / "d2nwg", "d2nwg.kernels": ROOT / "kernels"}

Edge = tuple[str, int]  # (file, line) of the import statement


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """{module name: source file} of every .py file under each package folder."""
    modules: dict[str, Path] = {}
    for package, folder in packages.items():
        for path in sorted(folder.rglob("*.py")):
            parts = path.relative_to(folder).with_suffix("").parts
            if "__pycache__" in parts or not all(p.isidentifier() for p in parts):
                continue
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node of ``tree``, at any depth, except under TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            children = node.orelse  # the guarded body never runs
        stack.extend(children)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` refers to: itself, else its longest prefix that is a module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_graph(modules: dict[str, Path]) -> dict[str, dict[str, Edge]]:
    """{importer: {imported: (file, line) of the first such import}} over ``modules``."""
    graph: dict[str, dict[str, Edge]] = {m: {} for m in modules}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _imports(tree):
            if isinstance(node, ast.Import):
                targets = [_resolve(alias.name, modules) for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: strip level - 1 packages off the importer's package
                    anchor = package.split(".")
                    anchor = anchor[: len(anchor) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [
                    _resolve(f"{base}.{alias.name}" if alias.name != "*" else base, modules)
                    for alias in node.names
                ]
            for target in targets:  # (a module importing itself is no cycle)
                if target not in (None, module) and target not in graph[module]:
                    graph[module][target] = (_shown(path), node.lineno)
    return graph


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def strongly_connected(graph: dict[str, dict[str, Edge]]) -> list[list[str]]:
    """Tarjan's strongly connected components of ``graph`` (iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                components.append(sorted(component))
    return components


def _shortest_cycle(graph: dict[str, dict[str, Edge]], start: str, members: set[str]) -> list[str]:
    """A shortest path start -> ... -> start inside ``members`` (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node]):
                if child not in members:
                    continue
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in parent:
                    parent[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")


def find_cycles(graph: dict[str, dict[str, Edge]]) -> list[str]:
    """One description per import cycle (strongly connected component): one cycle through
    its first module, then every import edge inside the component with file and line."""
    found = []
    for component in strongly_connected(graph):
        if len(component) == 1:
            continue
        members = set(component)
        cycle = _shortest_cycle(graph, component[0], members)
        edges = [
            f"    {a} -> {b}  ({file}:{line})"
            for a in component
            for b, (file, line) in sorted(graph[a].items())
            if b in members
        ]
        found.append(" -> ".join(cycle) + "\n" + "\n".join(edges))
    return found


# ----------------------------------------------------------------------------------------
# The checks.
# ----------------------------------------------------------------------------------------
def test_the_checker_sees_the_whole_package():
    modules = module_files(PACKAGES)
    for name in ("d2nwg", "d2nwg.ops", "d2nwg.ops.tokenize_op", "d2nwg.demo.report"):
        assert name in modules
    assert {"d2nwg.kernels", "d2nwg.kernels.tokenize", "d2nwg.kernels.sampler_step"} <= set(modules)
    graph = import_graph(modules)
    # a function-level import is an edge: the ops import their kernels inside functions
    assert "d2nwg.kernels.sampler_step" in graph["d2nwg.ops.sampler_step_op"]
    assert "d2nwg.ops.tokenize_op" in graph["d2nwg.ops"]


def test_no_import_cycles():
    cycles = find_cycles(import_graph(module_files(PACKAGES)))
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


# ----------------------------------------------------------------------------------------
# The checker on small planted trees.
# ----------------------------------------------------------------------------------------
def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for name, text in files.items():
        path = tmp_path / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return module_files({"pkg": tmp_path / "pkg"})


def test_finds_a_planted_cycle_through_a_function_level_import(tmp_path):
    modules = _tree(
        tmp_path,
        {
            "__init__.py": "",
            "a.py": "from pkg.b import helper\n",
            "b.py": "def helper():\n    from pkg import a\n    return a\n",
        },
    )
    cycles = find_cycles(import_graph(modules))
    assert len(cycles) == 1
    assert cycles[0].splitlines()[0] == "pkg.a -> pkg.b -> pkg.a"
    assert f"pkg.b -> pkg.a  ({tmp_path / 'pkg' / 'b.py'}:2)" in cycles[0]


def test_the_edge_rules(tmp_path):
    modules = _tree(
        tmp_path,
        {
            "__init__.py": "from pkg.sub import x\n",  # a package re-exporting: no cycle alone
            "sub/__init__.py": "from .x import f\n",
            "sub/x.py": "import os\nfrom .. import leaf\nfrom pkg.leaf import CONSTANT\n"
            "if TYPE_CHECKING:\n    import pkg\n",
            "sub/y.py": "from pkg.sub import f\n",  # the package's __init__
            "leaf.py": "import torch\nimport pkg.sub.x.f\n",
        },
    )
    graph = import_graph(modules)
    assert set(graph["pkg"]) == {"pkg.sub.x"}
    assert set(graph["pkg.sub"]) == {"pkg.sub.x"}
    assert set(graph["pkg.sub.x"]) == {"pkg.leaf"}  # os is external; TYPE_CHECKING skipped
    assert set(graph["pkg.sub.y"]) == {"pkg.sub"}
    assert set(graph["pkg.leaf"]) == {"pkg.sub.x"}  # pkg.sub.x.f is a name in pkg.sub.x
    cycles = find_cycles(graph)
    assert [c.splitlines()[0] for c in cycles] == ["pkg.leaf -> pkg.sub.x -> pkg.leaf"]


@pytest.mark.parametrize(
    "text",
    [
        "import pkg\n",
        "from pkg import *\n",
        "from . import VALUE\n",  # a name of the __init__, not a module
        "import pkg.a\nimport pkg.sub\n",  # itself (no cycle), then the package by prefix
        "def f():\n    from pkg import VALUE\n",
    ],
)
def test_a_submodule_importing_its_package_back_is_a_cycle(tmp_path, text):
    modules = _tree(tmp_path, {"__init__.py": "from pkg import a\n", "a.py": text})
    cycles = find_cycles(import_graph(modules))
    assert len(cycles) == 1 and cycles[0].splitlines()[0].startswith("pkg -> pkg.a -> pkg")
