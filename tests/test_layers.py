"""The package's imports point one way: down the layer order, with no cycle (function-level imports included).

Layers, low to high (a module may import its own layer and the layers below):

0. ``errors``, ``geometry``, ``keys``, ``paths``, ``bundle_paths`` (and the package root)
1. ``data``, ``transforms``, ``networks``, ``losses``, ``metrics``, ``visualize``
2. ``engines``
3. ``baselines``, ``evaluation``, ``benchmark``, ``experiments``
4. ``cli`` (the ``nexus-sr`` package), ``serving``, ``ops``, ``__main__``

Imports are read from the source with :mod:`ast` (nothing is imported), so the test also sees the
imports inside functions that only dodge a cycle at run time.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nexus_monai"
LAYERS = (
    ("", "errors", "geometry", "keys", "paths", "bundle_paths"),
    ("data", "transforms", "networks", "losses", "metrics", "visualize"),
    ("engines",),
    ("baselines", "evaluation", "benchmark", "experiments"),
    ("cli", "serving", "ops", "__main__"),
)
MAX_LINES = 600

# Known exceptions, each to be removed once its module is fixed: (importer, imported) for upward
# imports, and frozensets of modules for cycles. Empty: the package holds the order.
KNOWN_UPWARD: set[tuple[str, str]] = set()
KNOWN_CYCLES: set[frozenset[str]] = set()
KNOWN_LONG: set[str] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_names(path: Path, name: str) -> set[str]:
    """Dotted names every ``import`` / ``from ... import`` of the file refers to (relative ones resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{alias.name}" for alias in node.names)
    return out


def import_graph() -> dict[str, set[str]]:
    """``module -> package modules it imports`` (a ``from pkg import name`` counts as ``pkg.name`` when that
    is a module, else as ``pkg``)."""
    mods = modules()
    graph = {}
    for name, path in mods.items():
        edges = set()
        for target in imported_names(path, name):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("nexus_monai"):
                edges.add(target)
        graph[name] = edges
    return graph


def layer(name: str) -> int:
    top = name.split(".")[1] if "." in name else ""
    for i, group in enumerate(LAYERS):
        if top in group:
            return i
    raise AssertionError(f"{name}: its top-level name {top!r} is in no layer; add it to LAYERS in test_layers.py")


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            advanced = False
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    advanced = True
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = set()
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.add(w)
                    if w == v:
                        break
                if len(component) > 1:
                    found.append(frozenset(component))
    return found


def test_every_module_is_in_a_layer():
    for name in modules():
        layer(name)


def test_no_upward_import():
    graph = import_graph()
    upward = {(a, b) for a, targets in graph.items() for b in targets if layer(b) > layer(a)}
    assert upward - KNOWN_UPWARD == set(), "imports pointing up the layer order:\n" + "\n".join(
        f"  {a} -> {b}" for a, b in sorted(upward - KNOWN_UPWARD))
    assert KNOWN_UPWARD - upward == set(), f"fixed, remove from KNOWN_UPWARD: {sorted(KNOWN_UPWARD - upward)}"


def test_no_import_cycle():
    found = set(cycles(import_graph()))
    assert found - KNOWN_CYCLES == set(), "import cycles:\n" + "\n".join(
        "  " + " <-> ".join(sorted(c)) for c in found - KNOWN_CYCLES)
    assert KNOWN_CYCLES - found == set(), f"fixed, remove from KNOWN_CYCLES: {KNOWN_CYCLES - found}"


def test_no_module_over_the_line_limit():
    long = {name for name, path in modules().items() if len(path.read_text().splitlines()) > MAX_LINES}
    assert long - KNOWN_LONG == set(), f"modules over {MAX_LINES} lines: {sorted(long - KNOWN_LONG)}"


@pytest.mark.parametrize("source,expected", [
    ("from nexus_monai.engines import predict\n", {"nexus_monai.engines", "nexus_monai.engines.predict"}),
    ("def f():\n    from nexus_monai.baselines.lrtv import lrtv\n", {"nexus_monai.baselines.lrtv"}),
    ("import nexus_monai.cli as cli\n", {"nexus_monai.cli"}),
    ("from ..evaluation.methods import bundle_model\n", {"nexus_monai.evaluation.methods"}),
    ("from . import inr\n", {"nexus_monai.engines", "nexus_monai.engines.inr"}),
])
def test_the_reader_sees_every_form_of_import(tmp_path, source, expected):
    """The checks above would pass vacuously if the reader missed an import form: each form is found
    (``from pkg import mod`` runs ``pkg/__init__`` too, so both count)."""
    path = tmp_path / "probe.py"
    path.write_text(source)
    mods = modules()
    found = set()
    for target in imported_names(path, "nexus_monai.engines.probe"):
        while target and target not in mods:
            target = target.rpartition(".")[0]
        if target.startswith("nexus_monai."):
            found.add(target)
    assert found == expected


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [frozenset({"a", "b", "c"})]
    assert cycles({"a": {"b"}, "b": set()}) == []
