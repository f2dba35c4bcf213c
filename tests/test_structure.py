"""The shape of the package: no import cycle among tame_lit's modules, and lower layers never import higher
ones (``../shared/specs/architecture.md``). Imports are read with ``ast`` at any depth (inside functions and
``TYPE_CHECKING`` blocks too), so an import hidden in a function still counts."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import ROOT

PACKAGE = ROOT / "tame_lit"

# lowest first; a module is placed by its first name after ``tame_lit.`` (``tame_lit.export.onnx`` -> export),
# so a module that becomes a package (data.py -> data/) keeps its place
LAYERS: list[set[str]] = [
    {"io", "system", "maps", "features", "layouts", "viz", "loggers", "registry", "statistics", "acceleration"},
    {"backbones"},
    {"heads", "metrics", "data"},
    {"explainers"},
    {"checkpoints", "export", "loading"},
    {"training", "clean_pass", "evaluation", "callbacks", "losses", "report", "merge", "config"},
    {"cli", "train", "evaluate", "explain", "known_answer"},
]
LEVEL = {name: level for level, names in enumerate(LAYERS) for name in names}


def modules(package: Path = PACKAGE) -> dict[str, Path]:
    """Every module of the package by dotted name; a package's ``__init__`` is the package itself."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported_names(name: str, path: Path) -> Iterator[str]:
    """Dotted names ``name`` imports, at any depth; relative imports resolved; ``from a import b`` gives
    ``a.b`` (the module, if b is one) and ``a``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                source = ".".join([*base, *([node.module] if node.module else [])])
            else:
                source = node.module or ""
            yield from (f"{source}.{alias.name}" for alias in node.names)
            yield source


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Edges between the package's modules, its root ``__init__`` left out (it only re-exports lazily)."""
    known = modules(package)
    root = package.name
    graph: dict[str, set[str]] = {name: set() for name in known if name != root}
    for name in graph:
        for imported in imported_names(name, known[name]):
            target = imported
            while target and target not in known:  # `from a import f`: a.f is no module, a is
                target = target.rpartition(".")[0]
            if target and target not in (root, name):
                graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path ``[a, b, ..., a]``, or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer by a lower one; ``__main__`` modules (``python -m`` entry points, which
    nothing imports) are exempt."""

    def top(name: str) -> str:
        return name.split(".")[1]

    return [
        f"{source} (layer {LEVEL[top(source)]}) imports {target} (layer {LEVEL[top(target)]})"
        for source, targets in sorted(graph.items())
        if not source.endswith(".__main__")
        for target in sorted(targets)
        if LEVEL[top(source)] < LEVEL[top(target)]
    ]


def test_there_is_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_top_level_module_is_placed_in_a_layer():
    unplaced = sorted({name.split(".")[1] for name in import_graph()} - set(LEVEL))
    assert not unplaced, f"place {unplaced} in LAYERS of tests/test_structure.py (which layer may it import?)"


def test_lower_layers_never_import_higher_ones():
    assert layer_violations(import_graph()) == []


def test_the_checks_see_imports_hidden_in_functions(tmp_path):
    """The analysis itself, on a small package: a function-level import closes a cycle and breaks layering."""
    package = tmp_path / "tame_lit"
    (package / "heads").mkdir(parents=True)
    (package / "__init__.py").write_text("def __getattr__(name):\n    from tame_lit.training import X\n")
    (package / "heads" / "__init__.py").write_text("from .base import head_maps\n")
    (package / "heads" / "base.py").write_text("from tame_lit import maps\n\ndef head_maps():\n    pass\n")
    (package / "maps.py").write_text("")
    (package / "training.py").write_text("from tame_lit.heads import head_maps\n")
    graph = import_graph(package)
    assert graph == {
        "tame_lit.heads": {"tame_lit.heads.base"},
        "tame_lit.heads.base": {"tame_lit.maps"},
        "tame_lit.maps": set(),
        "tame_lit.training": {"tame_lit.heads"},
    }
    assert find_cycle(graph) is None and layer_violations(graph) == []
    (package / "maps.py").write_text("def f():\n    from tame_lit.training import X\n")
    graph = import_graph(package)
    assert find_cycle(graph) == ["tame_lit.heads", "tame_lit.heads.base", "tame_lit.maps", "tame_lit.training",
                                 "tame_lit.heads"]  # fmt: skip
    assert layer_violations(graph) == ["tame_lit.maps (layer 0) imports tame_lit.training (layer 5)"]


def test_the_wheel_ships_every_package():
    """pyproject.toml lists the packages explicitly (conf/ ships as tame_lit.conf): a new sub-package that
    is not listed would be missing from the wheel while every test of a source checkout still passes."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(path.parent.relative_to(ROOT).parts) for path in PACKAGE.rglob("__init__.py")} | {
        "tame_lit.conf"
    }
    assert listed == on_disk
