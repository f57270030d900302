"""The package's floors: no module imports one on a floor above its own, and no import circles.

Every import is read from the source with `ast`: at the top of a module, inside functions (lazy imports)
and under `if TYPE_CHECKING:` alike, since each ties the modules together just the same. README.md's
Development section lists the same floors.
"""

import ast
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "llamatailor"
# Ground floor first; a module's floor is that of its top-level module or subpackage ("" is the package's
# own __init__.py). A module may import from its own floor or below.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("", "errors", "vocabulary", "cgroups", "hardware", "textfiles", "rundir", "cache", "distributed"),
    ("config", "stage_contract"),
    ("plots", "models"),
    ("data",),
    ("generation",),
    ("plan",),
    ("train",),
    ("evaluate",),
    ("export",),
    ("serve", "chat", "views", "pipeline"),
    ("ui",),
    ("cli", "__main__"),
)
FLOOR = {unit: floor for floor, units in enumerate(LAYERS) for unit in units}


@dataclass(frozen=True)
class Edge:
    source: str  # importing module, dotted
    target: str  # imported module, dotted
    where: str  # "src/llamatailor/x.py:12"


def module_files(source: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package under `source`."""
    modules = {}
    for path in sorted((source / PACKAGE).rglob("*.py")):
        parts = path.relative_to(source).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(node: ast.AST, module: str, is_package: bool, modules: dict[str, Path]) -> list[str]:
    """The package's modules an import statement loads: `from a import b` is the module a.b when there is
    one, else a; relative imports are resolved against `module`."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
        return [name for name in names if name in modules]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:  # one dot: the module's own package (a package's own, for an __init__.py)
        parts = module.split(".")
        anchor = parts[: len(parts) - node.level + (1 if is_package else 0)]
        base = ".".join([*anchor, *([base] if base else [])])
    if base not in modules:
        return []
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]


def import_edges(source: Path) -> list[Edge]:
    """Every import of one of the package's modules by another, wherever in the file it is written."""
    modules = module_files(source)
    edges = []
    for module, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            for target in imported(node, module, is_package, modules):
                if target != module:
                    where = f"{path.relative_to(source.parent)}:{node.lineno}"
                    edges.append(Edge(module, target, where))
    return list(dict.fromkeys(edges))  # `from a import b, c` names a once


def unit(module: str) -> str:
    """The top-level module or subpackage a module belongs to ("" for the package itself)."""
    return module.split(".")[1] if "." in module else ""


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle in a directed graph as [a, b, ..., a], or None when there is none (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def described(circle: list[str], edges: list[Edge], name: Callable[[str], str]) -> str:
    """A circle's steps, each with the file:line of one import that makes it."""
    steps = []
    for source, target in itertools.pairwise(circle):
        edge = next(e for e in edges if name(e.source) == source and name(e.target) == target)
        steps.append(f"{source or PACKAGE} -> {target or PACKAGE} ({edge.where})")
    return "; ".join(steps)


EDGES = import_edges(SOURCE)


def test_every_module_has_a_floor():
    units = {unit(module) for module in module_files(SOURCE)}
    missing = sorted(units - set(FLOOR))
    assert not missing, (
        f"give {', '.join(f'{PACKAGE}.{u}' for u in missing)} a floor in LAYERS (and README.md)"
    )


def test_no_module_imports_from_a_floor_above_its_own():
    breaches = [
        f"{edge.where} imports {edge.target}: {unit(edge.source) or PACKAGE} (floor {FLOOR[unit(edge.source)]}) "
        f"may not import {unit(edge.target)} (floor {FLOOR[unit(edge.target)]})"
        for edge in EDGES
        if FLOOR.get(unit(edge.target), -1) > FLOOR.get(unit(edge.source), len(LAYERS))
    ]
    assert not breaches, "imports from a floor above:\n" + "\n".join(breaches)


@pytest.mark.parametrize("level", ["module", "package"])
def test_no_import_circles(level):
    name = (lambda module: module) if level == "module" else unit
    graph: dict[str, set[str]] = {}
    for edge in EDGES:
        if name(edge.source) != name(edge.target):
            graph.setdefault(name(edge.source), set()).add(name(edge.target))
    found = cycle(graph)
    assert found is None, f"{level} import circle: {described(found, EDGES, name)}"


def test_vocabulary_is_the_ground_floor():
    vocabulary = [edge.where for edge in EDGES if edge.source == f"{PACKAGE}.vocabulary"]
    assert vocabulary == [], f"vocabulary.py imports from {PACKAGE} at {', '.join(vocabulary)}"


def test_the_checker_sees_lazy_relative_and_type_checking_imports(tmp_path):
    package = tmp_path / PACKAGE
    (package / "plan").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "train.py").write_text("")
    (package / "plan" / "__init__.py").write_text("")
    (package / "plan" / "memory.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from llamatailor import train\n"
        "def f():\n    from ..train import x\n"
        "from . import other\n"
    )
    (package / "plan" / "other.py").write_text("import llamatailor.plan.memory\n")
    edges = {(e.source, e.target, e.where.rsplit(":", 1)[1]) for e in import_edges(tmp_path)}
    assert edges == {
        ("llamatailor.plan.memory", "llamatailor.train", "3"),
        ("llamatailor.plan.memory", "llamatailor.train", "5"),
        ("llamatailor.plan.memory", "llamatailor.plan.other", "6"),
        ("llamatailor.plan.other", "llamatailor.plan.memory", "1"),
    }
    graph = {"a": {"b"}, "b": {"c"}, "c": {"b"}, "d": {"a"}}
    assert cycle(graph) == ["b", "c", "b"]
    assert cycle({"a": {"b"}, "b": {"c"}, "d": {"c"}}) is None
