"""The package's import graph: the library never imports the application, and no module imports
itself back through others (every import counts: top level, inside functions, under TYPE_CHECKING).

Read from the source with :mod:`ast`, so the check needs no import and sees lazy imports too. The
deprecation shims that keep old paths working for one release are left out: they only forward.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import PACKAGE, is_shim

APP = "heatmapbench.app"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_sources() -> dict[str, str]:
    return {module_name(p): p.read_text() for p in PACKAGE.rglob("*.py")}


def import_graph() -> dict[str, set[str]]:
    """Module -> the heatmapbench modules it imports (``from pkg import name`` counts as the
    submodule ``pkg.name`` where that is a module, else as ``pkg``)."""
    sources = package_sources()
    modules = {m for m, s in sources.items() if not is_shim(s)}
    graph: dict[str, set[str]] = {}
    for name in modules:
        path_is_package = (PACKAGE.parent / Path(*name.split("."))).is_dir()
        edges: set[str] = set()
        for node in ast.walk(ast.parse(sources[name])):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".") if path_is_package else name.split(".")[:-1]
                    anchor = anchor[:len(anchor) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in sources else base
                           for alias in node.names]
            else:
                continue
            edges.update(t for t in targets if t.startswith("heatmapbench") and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def is_app(module: str) -> bool:
    return module == APP or module.startswith(APP + ".")


def test_the_library_never_imports_the_application():
    upward = sorted(f"{m} imports {t}" for m, ts in import_graph().items() if not is_app(m)
                    for t in ts if is_app(t))
    assert not upward, "the library imports the application:\n  " + "\n  ".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    # a package's __init__ re-exporting its modules is not a cycle with them: count only module -> module
    found = cycles({m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()})
    assert not found, "import cycles:\n  " + "\n  ".join(" <-> ".join(c) for c in found)


def test_the_check_sees_an_upward_import_and_a_cycle():
    """Negative controls: the graph finds a lazy import inside a function, and a two-module cycle."""
    graph = import_graph()
    assert "heatmapbench.app.schema" in graph["heatmapbench.app.train"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_uses_no_deprecated_path():
    """The shims are for users' code: the package itself imports every module from its new home."""
    shims = {m for m, source in package_sources().items() if is_shim(source)}
    assert "heatmapbench.explain.graph" in shims and "heatmapbench.config" in shims  # the check sees them
    used = sorted(f"{m} imports {t}" for m, ts in import_graph().items() for t in ts if t in shims)
    assert not used, "deprecated paths used inside the package:\n  " + "\n  ".join(used)
