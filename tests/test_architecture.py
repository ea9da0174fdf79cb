"""The package's shape: the folders follow the data path and nothing imports back up it.

Every ``import`` in bioconf counts, function-local ones included. An import names the module it
reads (``from bioconf.runtime.build import build_model`` -> ``bioconf.runtime.build``; ``from
bioconf.runtime import weights`` -> ``bioconf.runtime.weights``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

PACKAGE = ROOT / "bioconf"

# Each layer may import only the layers listed before it (and itself).
LAYERS = (
    ("bioconf", "bioconf.errors", "bioconf.fs"),
    ("bioconf.schema",),
    ("bioconf.checkpoint",),
    ("bioconf.resolve",),
    ("bioconf.runtime",),
    ("bioconf.convert",),
    ("bioconf.demo", "bioconf.service"),
    ("bioconf.cli", "bioconf.__main__"),
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _target(name: str) -> str | None:
    """The bioconf module an imported name lives in (None outside bioconf)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str) -> set[str]:
    """The bioconf modules ``module`` imports, anywhere in its code."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(
                    [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                ).strip(".")
            names = [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {target for name in names if (target := _target(name)) and target != module}
    return found


GRAPH = {module: imports(module) for module in MODULES}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for child in GRAPH[node]:
            if child not in index:
                visit(child)
                low[node] = min(low[node], low[child])
            elif child in on_stack:
                low[node] = min(low[node], index[child])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(GRAPH):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_has_no_circle():
    assert _cycles() == []


def test_the_graph_sees_function_local_imports():
    """The cli imports the runtime only inside its commands: the graph must still see it."""
    assert "bioconf.runtime.run" in GRAPH["bioconf.cli"]


def _layer(module: str) -> int:
    for rank, names in enumerate(LAYERS):
        if any(module == name or module.startswith(name + ".") for name in names if name != "bioconf"):
            return rank
    assert module == "bioconf", module
    return 0


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_later_step(module):
    later = sorted(target for target in GRAPH[module] if _layer(target) > _layer(module))
    assert later == [], f"{module} imports a later step of the data path"


def test_every_module_is_in_a_layer():
    for module in MODULES:
        _layer(module)
