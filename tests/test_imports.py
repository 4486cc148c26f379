"""Imports run one way (docs/design.md), read from the source with ``ast``, without importing anything:
the library never imports ``train`` or ``benchmarks``; in ``train/``, the data sets and the tasks never
import the loop, the state, trained-model use or a CLI; nothing imports a CLI; no module imports
itself back through a circle; ``train/__init__.py`` imports nothing eagerly (``import train.data`` loads
no training loop)."""

from __future__ import annotations

import ast
import pathlib

import pytest

from tests.train_helpers import REPO

PACKAGES = ("aacn_jax", "train", "benchmarks")
CLIS = ("train.__main__", "train.predict", "train.convert", "train.compile")
LOOP_SIDE = (
    "train.loop",
    "train.program",
    "train.state",
    "train.aot",
    "train.cli",
    "train.inference",
    "train.warm_start",
    "train.torch_weights",
    *CLIS,
)


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(nodes: list[ast.stmt], modules: set[str]) -> set[str]:
    """The project modules imported anywhere in ``nodes`` (function-local imports included):
    ``from a.b import c`` counts as ``a.b.c`` where that is a module, else as ``a.b``."""
    found = set()
    for node in (inner for statement in nodes for inner in ast.walk(statement)):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, f"relative import of {node.module}: the project's imports are absolute"
            found |= {
                f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                for a in node.names
            }
    return {name for name in found if name in modules}


def import_graph(root: pathlib.Path = REPO) -> dict[str, set[str]]:
    paths = [p for package in PACKAGES for p in (root / package).rglob("*.py")]
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported(ast.parse(p.read_text()).body, modules) for p in paths}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every broken rule of the module docstring, as ``importer -> imported: rule``."""
    found = []
    for importer, targets in sorted(graph.items()):
        for target in sorted(targets):
            if importer.startswith("aacn_jax") and target.split(".")[0] in ("train", "benchmarks"):
                found.append(f"{importer} -> {target}: the library imports no training or benchmark code")
            if target in CLIS:
                found.append(f"{importer} -> {target}: nothing imports a CLI")
            if importer.startswith(("train.data", "train.tasks")) and target in LOOP_SIDE:
                found.append(f"{importer} -> {target}: data sets and tasks never import the loop side")
    found += [f"circle: {' -> '.join(circle)}" for circle in circles(graph)]
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each module that can reach itself (depth-first search)."""
    found, done = [], set()

    def visit(module: str, path: list[str]) -> None:
        for target in sorted(graph.get(module, ())):
            if target in path:
                found.append([*path[path.index(target) :], target])
            elif target not in done:
                visit(target, [*path, target])
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module, [module])
    return found


def test_imports_run_one_way():
    graph = import_graph()
    assert {"train.loop", "train.data", "train.tasks.detection", "aacn_jax.functional"} <= graph.keys()
    assert "train.data.coco" in graph["train.data.shapes"]  # the reader sees imports at all
    assert violations(graph) == []


@pytest.mark.parametrize(
    ("importer", "target", "rule"),
    [
        ("train.data.digits", "train.loop", "data sets and tasks never import the loop side"),
        ("train.tasks.detection", "train.inference", "data sets and tasks never import the loop side"),
        ("train.inference", "train.predict", "nothing imports a CLI"),
        ("aacn_jax.models.resnet", "train.data", "the library imports no training or benchmark code"),
        ("train.state", "train.loop", "circle: train.loop -> "),
    ],
)
def test_a_back_import_is_caught(importer, target, rule):
    graph = import_graph()
    graph[importer] = graph[importer] | {target}
    assert any(rule in problem for problem in violations(graph)), violations(graph)


def test_the_train_package_imports_nothing_eagerly():
    """Only a function-local import (the lazy ``train.load``): the top level of train/__init__.py imports
    no project module, so ``import train.<module>`` loads that module's imports alone."""
    source = (REPO / "train" / "__init__.py").read_text()
    modules = set(import_graph())
    top_level = [node for node in ast.parse(source).body if not isinstance(node, ast.FunctionDef)]
    assert imported(top_level, modules) == set()
    assert imported(ast.parse(source).body, modules) == {"train.inference"}  # the lazy load
