"""The package's layout: no import cycles, and the library imports none of the application.

The import graph is read from the source with ``ast``: every ``import`` and ``from ...
import`` statement, those inside functions included, is an edge. ``from pkg import name``
is an edge to ``pkg.name`` when that is a module, else to ``pkg``; a module's own
package ``__init__`` is not an implicit edge (else every package that re-exports its
modules would be a cycle).
"""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
APP = "sparseft.app"


def modules() -> dict[str, tuple[Path, bool]]:
    """Module name -> (file, is a package ``__init__``)."""
    found = {}
    for path in sorted((SRC / "sparseft").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {name: set() for name in mods}
    for name, (path, is_package) in mods.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in mods else source for a in node.names]
            else:
                continue
            graph[name].update(t for t in targets if t in mods and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each listed once from its smallest module name."""
    found = []

    def walk(start: str, node: str, path: list[str]) -> None:
        for nxt in sorted(graph[node]):
            if nxt == start:
                found.append(list(path))
            elif nxt > start and nxt not in path:
                walk(start, nxt, path + [nxt])

    for start in sorted(graph):
        walk(start, start, [start])
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "sparseft.methods" in graph["sparseft.model"]  # get_sparse_model's import of the methods
    assert "sparseft.checkpoint" in graph["sparseft.train"]


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    print(f"import cycles in sparseft: {len(found)}")
    assert found == [], "\n".join(" -> ".join(c + [c[0]]) for c in found)


def test_the_library_imports_nothing_from_the_application():
    graph = import_graph()
    library = [name for name in graph if name != APP and not name.startswith(APP + ".")]
    assert len(library) > 10
    offending = {name: sorted(t for t in graph[name] if t == APP or t.startswith(APP + ".")) for name in library}
    assert {k: v for k, v in offending.items() if v} == {}


def test_sweep_does_not_import_the_command_line():
    graph = import_graph()
    assert "sparseft.app.cli" not in graph["sparseft.app.sweep"]
    assert "sparseft.app.options" in graph["sparseft.app.sweep"]
