"""The package layout holds its shape (docs/design.md): no import cycle between the project's
modules (function-local imports included: a cycle hidden inside a function is still a cycle),
imports only downward between the layers, no module over ~400 lines, a small top level.

The graph is read from the source with `ast`, so the check is independent of import order;
`python -m pytest tests/test_layout.py -q` runs it in a second. To see the graph yourself:
`python tests/test_layout.py` prints every project import edge.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("simpo_ray", "analysis")
MAX_LINES = 420  # "no module over about 400 lines"
# Ray's workarounds stay in one quarantined module, each with the condition for removing it.
LONGER = {"simpo_ray.infra.ray_workarounds": 500}
TOP_LEVEL_MODULES = {"__init__.py", "errors.py", "io.py", "schema.py", "config.py", "cli.py", "tune.py",
                     "export.py"}
# What each layer may not import (a module's layer is its subpackage). Tensors stay below the search;
# the data layer knows no model, search or Ray; the training core knows no search.
FORBIDDEN = {
    "simpo_ray.data": ("simpo_ray.train", "simpo_ray.search", "simpo_ray.transfer", "simpo_ray.infra",
                       "simpo_ray.cli", "ray.tune", "optuna"),
    "simpo_ray.train": ("simpo_ray.search", "simpo_ray.transfer", "simpo_ray.cli", "ray.tune", "optuna"),
    "simpo_ray.transfer": ("simpo_ray.train.loop", "simpo_ray.infra", "simpo_ray.cli", "torch", "ray"),
    "simpo_ray.search": ("torch", "simpo_ray.cli", "simpo_ray.train.loop", "simpo_ray.train.logps",
                         "simpo_ray.train.loss", "simpo_ray.train.parallel"),
    "simpo_ray.guide": ("simpo_ray.train", "simpo_ray.data", "simpo_ray.search", "torch", "ray"),
    "analysis": ("torch", "ray", "simpo_ray.train.loop", "simpo_ray.infra", "simpo_ray.cli"),
}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """Every module `name` imports (at the top or inside a function), as dotted names; a
    `from package import module` counts as importing that module."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    return {m for m in found if m}


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports(name, path, known) if m in known and m != name}
            for name, path in known.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
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

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(graph()) == []


def test_the_cycle_check_finds_a_planted_cycle():
    g = graph()
    g["simpo_ray.errors"] = g["simpo_ray.errors"] | {"simpo_ray.search.run"}  # errors -> run -> ... -> errors
    assert any("simpo_ray.errors" in c for c in cycles(g))


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_import_downward_only(layer):
    known = modules()
    bad = []
    for name, path in known.items():
        if name.endswith("__main__"):  # a command's entry point: it runs the command line (cli)
            continue
        if name == layer or name.startswith(layer + "."):
            for m in imports(name, path, known):
                if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[layer]):
                    bad.append(f"{name} imports {m}")
    assert bad == []


def test_module_sizes_and_the_top_level():
    long = {name: n for name, path in modules().items()
            if (n := len(path.read_text().splitlines())) > LONGER.get(name, MAX_LINES)}
    assert long == {}
    top = {p.name for p in (ROOT / "simpo_ray").glob("*.py")}
    assert top == TOP_LEVEL_MODULES
    packages = {p.name for p in (ROOT / "simpo_ray").iterdir() if (p / "__init__.py").exists()}
    assert packages == {"bundled", "data", "guide", "infra", "search", "train", "transfer"}


def test_rays_private_modules_are_used_in_the_quarantine_only():
    known = modules()
    users = sorted(name for name, path in known.items()
                   if any(m == "ray._private" or m.startswith("ray._private.") or m.startswith("ray.train.v2._internal")
                          for m in imports(name, path, known)))
    assert users == ["simpo_ray.infra.ray_workarounds"]


if __name__ == "__main__":
    for src, dsts in sorted(graph().items()):
        for dst in sorted(dsts):
            print(f"{src} -> {dst}")
