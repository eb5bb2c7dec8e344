"""The package's import graph, read with ``ast`` (nothing is imported): no cycles, no upward imports, module sizes.

Layers, bottom to top; a module may import from its own layer or lower ones only (function-local imports count):

    0 utils, cli, paths, scripts        3 attribution/  (attributions, TIS store, TIS driver; provenance)
    1 data/  (formats, datasets, tokenizers, synthetic worlds)   4 analysis/  (statistics, significance, bias, replicates)
    2 iem/   (architectures, training)  5 evaluation/  (masking, explanation levels, evaluators)
                                        6 report/  (plots, gallery, demo)

A module still flat in ``cortex/`` counts at the layer of the package it is headed for (``FLAT`` below); a new
module must be placed in the table (the test fails on an unplaced one).
"""
import ast
from pathlib import Path

import pytest

CORTEX = Path(__file__).resolve().parents[1] / "cortex"

PACKAGES = {"cortex.data": 1, "cortex.iem": 2, "cortex.attribution": 3, "cortex.analysis": 4,
            "cortex.evaluation": 5, "cortex.report": 6}
FLAT = {
    "cortex": 0, "cortex.utils": 0, "cortex.cli": 0, "cortex.paths": 0, "cortex.scripts": 0,
    "cortex.figures": 0,  # the figures' style and save_figure: every layer draws a figure
    # the provenance chain: hashes and checks of every link up to the TIS run and the statistics
    "cortex.provenance": 3,
    # `make demo`'s runner (`python -m cortex.demo`); its report is cortex/report/demo_report.py
    "cortex.demo": 6,
}
# upward imports not yet removed, each with its reason; the test fails when one disappears (remove it here)
# or a new one appears
KNOWN_UPWARD: dict = {}
# modules over ~500 lines, each at its size now: the test fails if one grows or a new one passes the limit
MAX_LINES = 500
LARGE: dict = {}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(CORTEX.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(CORTEX.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The cortex modules ``name`` imports (top-level and function-local), resolved to modules of ``known``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t.startswith("cortex") and t != name:
                out.add(t)
    return out


def _layer(name: str) -> int | None:
    if name in FLAT:
        return FLAT[name]
    for pkg, layer in PACKAGES.items():
        if name == pkg or name.startswith(pkg + "."):
            return layer
    return None


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_layer(graph):
    assert [m for m in graph if _layer(m) is None] == [], "place the new module in FLAT or a package of PACKAGES"


def test_no_upward_imports(graph):
    upward = {(a, b) for a, deps in graph.items() for b in deps if _layer(b) > _layer(a)}
    assert upward == set(KNOWN_UPWARD), "\n".join(f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
                                                   for a, b in sorted(upward ^ set(KNOWN_UPWARD)))


def test_no_import_cycles(graph):
    cycles, state = [], {}

    def visit(m, stack):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                cycles.append(stack[stack.index(d):] + [d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_module_sizes():
    """Every module under ~500 lines, except the ones listed in LARGE (which may not grow)."""
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    print("\n".join(f"{n:>5}  {m}" for m, n in sorted(sizes.items(), key=lambda kv: -kv[1])[:15]))
    over = {m: n for m, n in sizes.items() if n > MAX_LINES and n > LARGE.get(m, 0)}
    assert over == {}, f"modules over {MAX_LINES} lines (split them, or list them in LARGE): {over}"
