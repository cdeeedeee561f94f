# SPDX-License-Identifier: BSD-2-Clause
"""The package's layers: imports point down, and no module imports itself back.

Every import counts, the ones inside functions too: a circle held apart by a
function-local import is still a circle (and the next module-level import
closes it).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "machinepy"
# Low to high; a module may import its own layer and the ones below it.
LAYERS = ("core", "runtime", "integrate", "supervise", "front", "entry")
FRONTS = ("service", "cli")  # side by side: neither imports the other ...
PUBLIC = {"machinepy.service.api"}  # ... except the service's published API
# Layers that must start lean (the one-shot `run` path): nothing heavy at import.
LEAN = ("core", "runtime", "supervise")
HEAVY = ("asyncio", "dbus_fast", "jeepney", "pyroute2", "argparse")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("main", "docgen", "__main__"):
        return "entry"
    return "front" if parts[1] in FRONTS else parts[1]


def imports(path: Path) -> list[tuple[str, bool, int]]:
    """(imported module, at module level?, line) for every import in PATH."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(node) for node in tree.body}
    found: list[tuple[str, bool, int]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, id(node) in top, node.lineno))
            # `from machinepy.x import y` may name a submodule y
            found += [(f"{node.module}.{a.name}", id(node) in top, node.lineno)
                      for a in node.names]
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges[name] = {m for m, _, _ in imports(path) if m in modules and m != name}
    return edges


def test_every_module_has_a_layer() -> None:
    for name in graph():
        if name == "machinepy":
            continue
        assert layer(name) in LAYERS, f"{name}: not in a layer folder"


def test_imports_point_down() -> None:
    wrong = []
    for name, deps in graph().items():
        for dep in deps:
            if dep == "machinepy" or dep in PUBLIC:
                continue
            mine, theirs = layer(name), layer(dep)
            if LAYERS.index(theirs) > LAYERS.index(mine):
                wrong.append(f"{name} -> {dep} ({mine} imports {theirs})")
            elif mine == theirs == "front" and name.split(".")[1] != dep.split(".")[1]:
                wrong.append(f"{name} -> {dep} (one front-end imports the other)")
    assert not wrong, "\n".join(sorted(wrong))


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles() -> None:
    edges = {k: {d for d in v if d != "machinepy"} for k, v in graph().items()}
    assert cycles(edges) == []


def test_cycle_finder_finds_a_circle() -> None:
    # The check above must be able to fail.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("lean", LEAN)
def test_lean_layers_import_nothing_heavy_at_module_level(lean: str) -> None:
    wrong = []
    for path in (PACKAGE / lean).rglob("*.py"):
        for mod, top, line in imports(path):
            if top and mod.split(".")[0] in HEAVY:
                wrong.append(f"{path.relative_to(PACKAGE)}:{line}: {mod}")
    assert not wrong, "\n".join(wrong)
