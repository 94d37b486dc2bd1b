"""The import graph of src/polytask: no cycles between modules, and every layer imports only what it may.

Imports are read with :mod:`ast`, as ``tools/import_check.py`` reads them: relative imports resolved,
imports inside functions counted, ``from a import b`` counted as importing both ``a`` and ``a.b``.
A cycle counts when it joins at least two modules that are not package ``__init__`` faces.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Callable

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "polytask"
ROUTES = ("joint", "continual", "merging")
CLI = ("cli", "commands")
COMPARE_USERS = ("polytask", "cli", "commands", "tour")  # compare spans the routes; only the front ends use it

Graph = dict[str, set[str]]


def layer(module: str) -> str:
    """The top-level part a module belongs to: ``polytask.models.arch.mmoe`` -> ``models``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


# name -> (what it forbids, predicate on (importer's layer, imported layer))
RULES: dict[str, tuple[str, Callable[[str, str], bool]]] = {
    "data-models": ("data must not import the models", lambda a, b: a == "data" and b == "models"),
    "models-routes": ("the models must not import a route, compare, the trainer or the CLI",
                      lambda a, b: a == "models" and b in (*ROUTES, "comparison", "trainer", *CLI)),
    "route-route": ("a route must not import another route or the CLI",
                    lambda a, b: a in ROUTES and a != b and b in (*ROUTES, *CLI)),
    "compare-cli": ("compare must not import the CLI", lambda a, b: a == "comparison" and b in CLI),
    "compare-users": ("only cli, commands, tour and the polytask package may import compare",
                      lambda a, b: b == "comparison" and a != b and a not in COMPARE_USERS),
    "weighting-models": ("a weighting must not import the models", lambda a, b: a == "weighting" and b == "models"),
    "trainer-cli": ("the trainer must not import the CLI", lambda a, b: a == "trainer" and b in CLI),
}


def source_modules(root: Path) -> dict[str, Path]:
    """Every module under ``root`` by dotted name; a package's ``__init__.py`` is the package itself."""
    mods = {}
    for f in sorted(root.rglob("*.py")):
        name = ".".join((root.name, *f.relative_to(root).with_suffix("").parts)).removesuffix(".__init__")
        mods[name] = f
    return mods


def imported_names(module: str, path: Path) -> list[str]:
    """The absolute dotted names ``path`` imports anywhere in it (functions included)."""
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


def import_graph(root: Path = SRC) -> tuple[Graph, set[str]]:
    """Module -> the modules it imports under ``root``, and the set of package ``__init__`` faces."""
    mods = source_modules(root)

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    edges: Graph = {}
    for m, f in mods.items():
        targets = {resolve(n) for n in imported_names(m, f) if n.split(".")[0] == root.name}
        edges[m] = {t for t in targets if t is not None and t != m}
    return edges, {m for m, f in mods.items() if f.name == "__init__.py"}


def forbidden_edges(edges: Graph, rule: str) -> list[str]:
    """One message per edge that breaks ``rule``, naming the edge."""
    why, breaks = RULES[rule]
    return [f"{a} -> {b} ({why})" for a in sorted(edges) for b in sorted(edges[a])
            if layer(a) != layer(b) and breaks(layer(a), layer(b))]


def _components(edges: Graph) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[set[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            v, it = work[-1]
            w = next(it, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(edges.get(w, ())))))
                elif w in on:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = set()
                while True:
                    w = stack.pop()
                    on.discard(w)
                    comp.add(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    out.append(comp)
    return out


def _cycle_through(start: str, comp: set[str], edges: Graph) -> list[str]:
    """A shortest import path ``start -> ... -> start`` inside the component ``comp``."""
    came: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(edges[v] & comp):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(came[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if w not in came:
                    came[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is on no cycle of its component")


def cycles(edges: Graph, faces: set[str]) -> list[str]:
    """One message per import cycle that joins two or more modules besides package faces."""
    out = []
    for comp in _components(edges):
        real = sorted(comp - faces)
        if len(real) > 1:
            out.append("import cycle: " + " -> ".join(_cycle_through(real[0], comp, edges))
                       + f" (modules in the cycle: {', '.join(sorted(comp))})")
    return out


def find_violations(edges: Graph, faces: set[str] = frozenset()) -> list[str]:
    """Every broken layering rule and every import cycle of the graph, one message each."""
    return [msg for rule in RULES for msg in forbidden_edges(edges, rule)] + cycles(edges, faces)


# ---------------------------------------------------------------- the checker itself

def test_checker_finds_a_cycle_and_forbidden_edges_in_a_synthetic_graph():
    edges = {
        "polytask.data.mnist": {"polytask.models.backbones", "polytask.tasks"},
        "polytask.models.backbones": {"polytask.models.pretrained"},
        "polytask.models.pretrained": {"polytask.models.backbones", "polytask.trainer"},
        "polytask.merging.fisher": {"polytask.continual.ewc", "polytask.merging"},
        "polytask.merging": {"polytask.merging.fisher"},  # a face re-exporting its module: no cycle
        "polytask.comparison.table": {"polytask.joint", "polytask.continual", "polytask.merging"},
        "polytask.tour": {"polytask.comparison.table"},
        "polytask.weighting.ew": {"polytask.comparison.table"},
        "polytask.continual.ewc": set(), "polytask.joint": set(), "polytask.tasks": set(), "polytask.trainer": set(),
    }
    found = find_violations(edges, faces={"polytask.merging", "polytask.joint"})
    assert found == [
        "polytask.data.mnist -> polytask.models.backbones (data must not import the models)",
        "polytask.models.pretrained -> polytask.trainer (the models must not import a route, compare, the trainer or the CLI)",
        "polytask.merging.fisher -> polytask.continual.ewc (a route must not import another route or the CLI)",
        "polytask.weighting.ew -> polytask.comparison.table (only cli, commands, tour and the polytask package may import compare)",
        "import cycle: polytask.models.backbones -> polytask.models.pretrained -> polytask.models.backbones "
        "(modules in the cycle: polytask.models.backbones, polytask.models.pretrained)",
    ]
    clean = {"polytask.data.mnist": {"polytask.tasks"}, "polytask.tasks": set()}
    assert find_violations(clean) == []


def test_checker_resolves_relative_and_function_level_imports(tmp_path):
    pkg = tmp_path / "polytask"
    (pkg / "data").mkdir(parents=True)
    (pkg / "models").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data" / "__init__.py").write_text("from . import mnist\n")
    (pkg / "data" / "mnist.py").write_text("def build():\n    from ..models.backbones import cnn\n")
    (pkg / "models" / "__init__.py").write_text("")
    (pkg / "models" / "backbones.py").write_text("import polytask.data.mnist\n")
    edges, faces = import_graph(pkg)
    assert edges["polytask.data.mnist"] == {"polytask.models.backbones"}
    assert edges["polytask.data"] == {"polytask.data.mnist"}
    assert faces == {"polytask", "polytask.data", "polytask.models"}
    assert cycles(edges, faces) == ["import cycle: polytask.data.mnist -> polytask.models.backbones -> "
                                    "polytask.data.mnist (modules in the cycle: polytask.data.mnist, "
                                    "polytask.models.backbones)"]


# ---------------------------------------------------------------- the source tree

@pytest.fixture(scope="module")
def graph() -> tuple[Graph, set[str]]:
    edges, faces = import_graph()
    assert len(edges) > 50 and "polytask.sources" in edges["polytask.models.pretrained"]  # the walk sees the tree
    return edges, faces


def test_no_import_cycles(graph):
    found = cycles(*graph)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("rule", list(RULES))
def test_layering(graph, rule):
    found = forbidden_edges(graph[0], rule)
    assert not found, "\n".join(found)
