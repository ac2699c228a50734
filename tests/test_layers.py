"""The package's layers hold: every import of a cpt_bench module (top-level, inside functions, under TYPE_CHECKING)
points down ``LAYERS`` or within its own layer, and no modules import each other around a circle.

A layer is a subpackage or a top-level module. To place a new one, insert it in ``LAYERS`` above everything it
imports and below everything that imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cpt_bench

PACKAGE_DIR = Path(cpt_bench.__file__).resolve().parent
PACKAGE = PACKAGE_DIR.name

# Bottom first: a layer may import only the layers before it (and itself).
LAYERS = (
    "cpt_bench",  # the package's __init__ (its version)
    "errors",  # the error policy: UserError and the command-line wrapper
    "files",  # atomic writes, hashes
    "provenance",  # environment records, peak memory
    "stats",  # paired statistics
    "assets",  # the embedded model, corpora and zero-shot sets, the cache
    "corpus",  # corpus specs and the corpus-kind registry
    "tokens",  # corpus -> token streams
    "perplexity",  # windows and perplexity
    "compress",  # compression specs, algorithms, checkpoints, kernels
    "models",  # the one model loader (dense or compressed)
    "recovery",  # recovery methods (soft / hard prompts, LoRA): the kind registry, training, artifacts
    "lmeval",  # the cpt adapter, cpt-lm-eval, the task manager, the lmeval: corpus kind
    "evaluate",  # cpt-bench evaluate
    "matrix",  # configs, plans, runs, the results store
    "report",  # reports and the leaderboard of runs
    "cli",  # cpt-bench: composes the rest
)


def module_names() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    modules = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[tuple[str, int]]:
    """(module of the package, line) for every import in ``path``, wherever it stands (functions and
    ``if TYPE_CHECKING:`` blocks included); ``from P import m`` counts as importing module ``P.m`` when it is one."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add((target, node.lineno))
    return found


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def import_graph() -> dict[str, set[tuple[str, int]]]:
    modules = module_names()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[tuple[str, int]]]) -> list[str]:
    """One line per import of a layer above the importing module's own (layers missing from ``LAYERS`` are
    ``test_every_module_belongs_to_a_layer``'s to report)."""
    rank = {layer: index for index, layer in enumerate(LAYERS)}
    problems = []
    for module, targets in sorted(graph.items()):
        for target, line in sorted(targets):
            if rank.get(layer_of(target), -1) > rank.get(layer_of(module), len(LAYERS)):  # unknown: see below
                problems.append(f"{module} (line {line}) imports {target}: layer {layer_of(module)!r} sits below "
                                f"{layer_of(target)!r} in LAYERS")
    return problems


def packages() -> set[str]:
    """The modules that are packages (an ``__init__.py``)."""
    return {name for name, path in module_names().items() if path.name == "__init__.py"}


def module_circles(graph: dict[str, set[tuple[str, int]]], package_names: set[str]) -> list[list[str]]:
    """Circles of modules importing each other (a package's ``__init__`` importing its own modules excepted)."""
    edges = {module: sorted({target for target, _ in targets
                             if not (module in package_names and target.startswith(module + "."))})
             for module, targets in graph.items()}
    circles, done, stack = [], set(), []

    def visit(module: str) -> None:
        stack.append(module)
        for target in edges[module]:
            if target in stack:
                circles.append(stack[stack.index(target):] + [target])
            elif target not in done:
                visit(target)
        stack.pop()
        done.add(module)

    for module in sorted(edges):
        if module not in done:
            visit(module)
    return circles


def test_every_module_belongs_to_a_layer():
    unknown = sorted({layer_of(module) for module in module_names()} - set(LAYERS))
    assert not unknown, f"modules outside LAYERS (add each to LAYERS in its place): {', '.join(unknown)}"


def test_no_module_imports_a_layer_above_its_own():
    problems = upward_imports(import_graph())
    assert not problems, "upward imports (move the concept down to its home instead):\n" + "\n".join(problems)


def test_no_modules_import_each_other_in_a_circle():
    circles = module_circles(import_graph(), packages())
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(circle) for circle in circles)


@pytest.mark.parametrize("source, expected", [
    ("import cpt_bench.report\n", "upward"),
    ("def later():\n    from cpt_bench.matrix import run\n", "upward"),
    ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cpt_bench.lmeval.adapter import CptLM\n",
     "upward"),
    ("from cpt_bench.errors import UserError\n", None),
])
def test_the_check_sees_every_kind_of_import(source, expected, tmp_path):
    """An import in ``corpus`` of a higher layer is found at top level, inside a function and under TYPE_CHECKING."""
    path = tmp_path / "corpus.py"
    path.write_text(source, encoding="utf-8")
    graph = {f"{PACKAGE}.corpus": imported_modules(f"{PACKAGE}.corpus", path, module_names())}
    problems = upward_imports(graph)
    assert bool(problems) == (expected == "upward"), problems
    assert all("line" in problem and "imports" in problem for problem in problems)


def test_a_circle_is_reported_with_its_modules():
    graph = {"cpt_bench.report.a": {("cpt_bench.report.b", 3)}, "cpt_bench.report.b": {("cpt_bench.report.a", 5)},
             "cpt_bench.report": {("cpt_bench.report.a", 1)}}
    assert module_circles(graph, {"cpt_bench.report"}) == [
        ["cpt_bench.report.a", "cpt_bench.report.b", "cpt_bench.report.a"]]
