"""The package's shape, enforced: public surface, one-way arrows, no cycles, modules of one concern.

Why a test: a layout that only a README describes drifts. These fail when a
recipe reaches into a private module, when the launcher starts depending on
the adapter, or when an import cycle or an oversized module creeps in.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import backends

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = sorted(p for p in (ROOT / "backends").rglob("*.py") if "_cpu_kernels" not in p.parts)
RECIPES = sorted((ROOT / "recipes").rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """``(module, names)`` of every import in ``path``, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([module] if module else []))
            found.append((module, [alias.name for alias in node.names]))
    return found


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_recipes_import_only_public_names(path):
    for module, names in _imports(path):
        if not module.startswith("backends"):
            continue
        private = [part for part in module.split(".") if part.startswith("_")] + [n for n in names if n.startswith("_")]
        assert not private, f"{path.name} imports private {private} from {module}; use the public API"


def test_the_launcher_does_not_import_the_adapter():
    for path in LIBRARY:
        if "launcher" in path.parts:
            for module, _ in _imports(path):
                assert not module.startswith("backends.adapter"), f"{path} imports {module}"


def test_no_import_cycles_inside_the_library():
    modules = {_module_name(p): p for p in LIBRARY}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for module, names in _imports(path):
            for candidate in [module] + [f"{module}.{n}" for n in names]:
                if candidate in modules and candidate != name:
                    targets.add(candidate)
        graph[name] = targets
    # A package's __init__ re-exports its modules; only edges between implementation modules can cycle.
    packages = {n for n, p in modules.items() if p.name == "__init__.py"}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph[node] - packages:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in graph:
        if node not in state and node not in packages:
            visit(node, [])


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_module_declares_its_surface_and_stays_small(path):
    tree = ast.parse(path.read_text())
    declared = any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets)
                   for node in tree.body)
    assert declared, f"{path} has no __all__"
    assert len(path.read_text().splitlines()) <= 350, f"{path} is over 350 lines: split it by concern"


def test_the_top_level_reexports_resolve():
    for name in backends.__all__:
        assert getattr(backends, name) is not None
