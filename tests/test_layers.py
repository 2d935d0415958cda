"""The package's import graph: no circles, and no import that runs back up the layers.

Every import counts, those inside functions included (a lazy import is still a dependency).
The layers, bottom up — a module may import its own layer and those below it:

    0  _provenance, _io, _report, _console   facts about the run, file writes, the renderer,
                                             terminal output
    1  kernels                               the CPU / Triton / reference kernels
    2  functional (and its private parts)    the ops, dispatch, autograd
    3  nn                                    the modules
    4  _inventory, convert                   which modules are norms; conversion
    5  monitor, audit, faults                telemetry; the release audit; fault injection
    6  bench, canary, guard, integrations    benchmarks; the canary gate; the serving guard;
                                             the Hugging Face Trainer callback
    7  study, _demo                          the study; the demo
    8  _cli                                  the command line

``normkit/__init__`` is not a layer: it names everything, lazily.

``KNOWN`` lists the edges that still break these rules while issue 28 is under way; it only
shrinks, and a listed edge that is gone fails the test too (so the list stays true).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "src" / "normkit"

_LAYERS = [
    (0, ("_provenance", "_io", "_report", "_console")),
    (1, ("kernels",)),
    (2, ("functional", "_dispatch", "_autograd", "_ops", "_validate", "_options", "_group",
         "_dropout")),
    (3, ("nn",)),
    (4, ("_inventory", "convert")),
    (5, ("monitor", "audit", "faults")),
    (6, ("bench", "canary", "guard", "integrations")),
    (7, ("study", "_demo")),
    (8, ("_cli",)),
]


KNOWN_UP: set[tuple[str, str]] = set()
KNOWN_CIRCLES: list[list[str]] = []


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        mods[".".join(parts)] = f
    return mods


def layer(module: str) -> int | None:
    """The layer of ``normkit.x.y`` by its first component below ``normkit``."""
    top = module.split(".")[1] if "." in module else None
    for rank, names in _LAYERS:
        if top in names:
            return rank
    return None


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The normkit modules ``module`` imports (anywhere in its body)."""
    is_pkg = path.name == "__init__.py"
    base = module.split(".") if is_pkg else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                up = base[: len(base) - node.level + 1]
                stem = ".".join(up + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # "from . import x" imports the submodule x where there is one
            names = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in known else stem
                     for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:  # normkit.a.b.attr -> normkit.a.b
                name = name.rpartition(".")[0]
            if name.startswith("normkit"):
                out.add(name)
    out.discard(module)
    return out


def graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: _imports(m, p, known) for m, p in mods.items()}


def test_every_module_has_a_layer():
    assert [m for m in _modules() if m != "normkit" and layer(m) is None] == []


def test_no_import_runs_back_up_the_layers():
    g = graph()
    up = {(m, d) for m, deps in g.items() if m != "normkit"
          for d in deps if d != "normkit" and layer(d) > layer(m)}
    assert sorted(up - KNOWN_UP) == [], "\n".join(
        f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, d in sorted(up - KNOWN_UP))
    assert sorted(KNOWN_UP - up) == [], "fixed: remove these from KNOWN_UP"


def test_no_import_circles():
    g = {m: {d for d in deps if d != "normkit"} for m, deps in graph().items()}
    # a package's __init__ re-exporting its modules is not a circle with them
    for m in g:
        g[m] = {d for d in g[m] if not (d == m.rpartition(".")[0])}
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(g):
        if v not in index:
            visit(v)
    new = [c for c in sccs if c not in KNOWN_CIRCLES]
    assert new == [], "\n".join(" <-> ".join(c) for c in new)
    assert [c for c in KNOWN_CIRCLES if c not in sccs] == [], "fixed: remove from KNOWN_CIRCLES"


@pytest.mark.parametrize("module", ["normkit.kernels.cpu", "normkit.functional"])
def test_graph_sees_known_edges(module):
    """The walk itself works: edges that exist are found."""
    assert graph()[module]
