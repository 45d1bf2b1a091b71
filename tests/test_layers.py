"""The import arrows of resopt/ point one way: every ``import`` of a resopt module (at the top of a file, inside a
function, under ``TYPE_CHECKING``: all of them, read with ``ast``) goes to the importer's own room or to a room
below it in the layer order that ARCHITECTURE.md writes down, and no circle of imports spans two rooms. A room is
a subpackage (``resopt/bench/``) or a top-level module (``resopt/kinds.py``). The order is parsed from the
document itself, so the two cannot disagree."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from conftest import REPO

PACKAGE = REPO / "resopt"


def layer_order(text: str) -> list[list[str]]:
    """The rooms per layer, top first, from the ```layers block of ARCHITECTURE.md."""
    m = re.search(r"^```layers\n(.*?)^```", text, re.M | re.S)
    assert m, "ARCHITECTURE.md has no ```layers block"
    return [line.split() for line in m.group(1).splitlines() if line.strip() and not line.startswith("#")]


def modules(root: Path = PACKAGE) -> dict[str, Path]:
    out = {}
    for f in sorted(root.rglob("*.py")):
        parts = list(f.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def room(module: str) -> str:
    """``resopt.bench.plan`` -> ``bench``; ``resopt.kinds`` -> ``kinds``; the package itself -> ``resopt``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def imports(mods: dict[str, Path]) -> list[tuple[str, str, int]]:
    """(importing module, imported resopt module, line) for every import statement in ``mods``."""

    def resolve(name: str) -> str | None:
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    found = []
    for mod, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the package the module is in
                    base = mod.split(".") if path.name == "__init__.py" else mod.split(".")[:-1]
                    base = base[:len(base) - node.level + 1]
                    head = ".".join(base + ([node.module] if node.module else []))
                else:
                    head = node.module or ""
                # `from resopt.x import y` imports module resopt.x.y when there is one, else a name of resopt.x
                targets = [f"{head}.{a.name}" if f"{head}.{a.name}" in mods else head for a in node.names]
            else:
                continue
            for t in targets:
                r = resolve(t) if t.split(".")[0] == PACKAGE.name else None
                if r and r != mod:
                    found.append((mod, r, node.lineno))
    return found


def cross_room_circles(edges: list[tuple[str, str, int]]) -> list[list[str]]:
    """Strongly connected sets of modules (Tarjan) that hold modules of more than one room."""
    return [c for c in circles(edges) if len({room(m) for m in c}) > 1]


def circles(edges: list[tuple[str, str, int]]) -> list[list[str]]:
    """Strongly connected sets of more than one module (Tarjan): every import circle, sorted."""
    graph: dict[str, set[str]] = {}
    for a, b, _ in edges:
        graph.setdefault(a, set()).add(b)
        graph.setdefault(b, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def upward(edges: list[tuple[str, str, int]], layers: list[list[str]], mods: dict[str, Path]) -> list[str]:
    level = {r: i for i, line in enumerate(layers) for r in line}
    return [f"{mods[a].relative_to(REPO)}:{line} imports {b} ({room(a)}, layer {level[room(a)]} -> {room(b)}, "
            f"layer {level[room(b)]})"
            for a, b, line in edges if level[room(b)] < level[room(a)]]


@pytest.fixture(scope="module")
def layers() -> list[list[str]]:
    return layer_order((REPO / "ARCHITECTURE.md").read_text())


def test_every_room_has_one_layer(layers: list[list[str]]) -> None:
    placed = [r for line in layers for r in line]
    assert len(placed) == len(set(placed)), f"a room is in two layers: {placed}"
    rooms = {room(m) for m in modules()}
    assert rooms == set(placed), (f"rooms without a layer in ARCHITECTURE.md: {sorted(rooms - set(placed))}; "
                                  f"layers naming no room: {sorted(set(placed) - rooms)}")


def test_no_import_points_up(layers: list[list[str]]) -> None:
    mods = modules()
    bad = upward(imports(mods), layers, mods)
    assert not bad, "imports against the layer order of ARCHITECTURE.md:\n" + "\n".join(bad)


def test_no_circle_across_rooms() -> None:
    circles = cross_room_circles(imports(modules()))
    assert not circles, "import circles across rooms: " + "; ".join(" -> ".join(c) for c in circles)


# Rooms whose modules still import each other in a circle (a package's ``__init__`` and a module of it). Every
# other room is circle-free inside too (quantize: config <- pipeline <- modes <- the package's entry points); a
# room leaves this list once its circle is gone, and the test below fails until it does.
CIRCLES_INSIDE = {"data", "optimize", "prune", "report"}


def test_no_circle_inside_a_room() -> None:
    found = {room(c[0]): c for c in circles(imports(modules())) if len({room(m) for m in c}) == 1}
    new = {r: c for r, c in found.items() if r not in CIRCLES_INSIDE}
    assert not new, "import circles inside a room: " + "; ".join(" -> ".join(c) for c in new.values())
    assert set(found) == CIRCLES_INSIDE, f"no circle inside {sorted(CIRCLES_INSIDE - set(found))} any more: " \
                                         f"drop it from CIRCLES_INSIDE"


def test_the_checks_see_function_level_relative_and_upward_imports(tmp_path: Path) -> None:
    """The readers above on a small package written here: a circle hidden in function bodies, a relative
    import and an upward one are all found (so a clean result on resopt/ means something)."""
    pkg = tmp_path / "resopt"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("def f():\n    from resopt.high import g\n")
    (pkg / "low" / "util.py").write_text("from . import other\n")
    (pkg / "low" / "other.py").write_text("")
    (pkg / "high.py").write_text("def g():\n    import resopt.low.util\n    from resopt.low import util\n")
    mods = modules(pkg)
    edges = imports(mods)
    assert sorted({(a, b) for a, b, _ in edges}) == [
        ("resopt.high", "resopt.low.util"), ("resopt.low", "resopt.high"), ("resopt.low.util", "resopt.low.other")]
    assert cross_room_circles(edges) == []  # low -> high -> low.util is no circle: low.util is not low
    (pkg / "low" / "util.py").write_text("from . import other\n\n\ndef h():\n    from resopt.high import g\n")
    edges = imports(mods)
    assert cross_room_circles(edges) == [["resopt.high", "resopt.low.util"]]
    order = layer_order("x\n```layers\nhigh\n# a comment\nlow resopt\n```\n")
    assert order == [["high"], ["low", "resopt"]]
    bad = upward(edges, order, {m: REPO / "x" / p.name for m, p in mods.items()})
    assert [b.split(" imports ")[1].split(" (")[0] for b in bad] == ["resopt.high", "resopt.high"]
    (pkg / "low" / "other.py").write_text("def k():\n    from resopt.low import util\n")  # inside one room
    edges = imports(mods)
    assert circles(edges) == [["resopt.high", "resopt.low.other", "resopt.low.util"]]
    (pkg / "low" / "util.py").write_text("from . import other\n")
    edges = imports(mods)
    assert cross_room_circles(edges) == [] and circles(edges) == [["resopt.low.other", "resopt.low.util"]]
