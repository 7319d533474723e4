"""No import cycles in mesh/ and node/, counting every import a module makes.

A cycle hidden behind a function-local import (or an `if TYPE_CHECKING:` one) still ties two
modules into one: neither can be read, tested or moved without the other, and the import
order decides which half is half-initialised. So the graph here has an edge for every
`import` statement in a file, wherever it stands: at module level, under TYPE_CHECKING, or
inside a function. Function-local imports of heavy third-party modules (llama_cpp, ray) are
fine: only our own modules are nodes of the graph, so those are no edges at all.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("mesh", "node")

@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    where: str  # "module-level", "TYPE_CHECKING" or "function-local"

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line}, {self.where})"


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the packages."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


def _known(name: str, modules: dict[str, Path]) -> str | None:
    """The module of ours that importing `name` runs: itself, or the nearest package above."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool, modules: dict[str, Path]) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.modules = modules
        self.edges: list[Edge] = []
        self._depth = 0  # how many function bodies enclose the current node
        self._typing_only = 0  # how many `if TYPE_CHECKING:` blocks do

    def _function(self, node: ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda) -> None:
        self._depth += 1
        self.generic_visit(node)
        self._depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _function

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            self._typing_only += 1
            for child in node.body:
                self.visit(child)
            self._typing_only -= 1
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def _add(self, name: str, line: int) -> None:
        target = _known(name, self.modules)
        if target is not None and target != self.module:
            where = "function-local" if self._depth else "TYPE_CHECKING" if self._typing_only else "module-level"
            self.edges.append(Edge(self.module, target, line, where))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node.lineno)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        base = node.module or ""
        if node.level:  # relative: from the package, one level up per extra dot
            anchor = self.package.split(".")[: len(self.package.split(".")) - (node.level - 1)]
            base = ".".join([*anchor, *([base] if base else [])])
        for alias in node.names:
            # `from pkg import sub` imports the submodule pkg.sub when there is one.
            name = f"{base}.{alias.name}"
            self._add(name if name in self.modules else base, node.lineno)


def import_graph(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, list[Edge]]:
    modules = module_files(root, packages)
    graph: dict[str, list[Edge]] = {}
    for module, path in modules.items():
        visitor = _Imports(module, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(), filename=str(path)))
        graph[module] = visitor.edges
    return graph


def _strongly_connected(graph: dict[str, list[Edge]]) -> list[list[str]]:
    """Tarjan's components of more than one module, iteratively (no recursion limit)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, int]] = [(start, 0)]
        while work:
            node, i = work.pop()
            if i == 0:
                index[node] = low[node] = len(index)
                stack.append(node)
                on_stack.add(node)
            targets = [e.target for e in graph[node]]
            if i < len(targets):
                work.append((node, i + 1))
                target = targets[i]
                if target not in index:
                    work.append((target, 0))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
    return components


def _one_cycle(graph: dict[str, list[Edge]], component: list[str]) -> list[Edge]:
    """A shortest cycle through the component's first module, as the edges that make it."""
    members = set(component)
    start = component[0]
    came: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for edge in graph[node]:
                if edge.target not in members:
                    continue
                if edge.target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came[path[0].source])
                    return path
                if edge.target not in came:
                    came[edge.target] = edge
                    following.append(edge.target)
        frontier = following
    raise AssertionError(f"no cycle through {start} in {component}")


def cycles(graph: dict[str, list[Edge]], ignored: frozenset[tuple[str, str]] = frozenset()) -> list[list[Edge]]:
    kept = {m: [e for e in edges if (e.source, e.target) not in ignored] for m, edges in graph.items()}
    return [_one_cycle(kept, component) for component in _strongly_connected(kept)]


def test_mesh_and_node_have_no_import_cycle() -> None:
    found = cycles(import_graph(REPO))
    report = "\n".join("cycle:\n  " + "\n  ".join(str(e) for e in cycle) for cycle in found)
    assert not found, f"import cycles (move what both sides need into a module both import):\n{report}"


def test_a_cycle_behind_a_function_local_import_is_found(tmp_path: Path) -> None:
    """The detector itself: a cycle through a lazy import, a TYPE_CHECKING one and a relative
    one is reported with its edges; a lazy import of a third-party module is no edge."""
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "sub" / "__init__.py").write_text("")
    (package / "a.py").write_text("from pkg.sub import b\n")
    (package / "sub" / "b.py").write_text("def f():\n    from ..c import g\n    import llama_cpp\n")
    (package / "c.py").write_text("import typing\nif typing.TYPE_CHECKING:\n    from pkg import a\n")
    (package / "d.py").write_text("import pkg.a\n")  # into the cycle, not part of it
    graph = import_graph(tmp_path, ["pkg"])
    assert [str(e) for e in graph["pkg.sub.b"]] == ["pkg.sub.b -> pkg.c (line 2, function-local)"]
    assert [str(e) for e in graph["pkg.c"]] == ["pkg.c -> pkg.a (line 3, TYPE_CHECKING)"]
    [cycle] = cycles(graph)
    assert {(e.source, e.target) for e in cycle} == {("pkg.a", "pkg.sub.b"), ("pkg.sub.b", "pkg.c"),
                                                    ("pkg.c", "pkg.a")}
    assert cycles(graph, frozenset({("pkg.c", "pkg.a")})) == []
