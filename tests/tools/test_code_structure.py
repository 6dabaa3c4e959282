"""The code's shape stays readable: size limits, imports that go one way, and torch internals in one
module (docs/design.md). Read from the source with `ast`: nothing is imported or run."""

from __future__ import annotations

import ast
import pathlib
from typing import Dict, Iterator, List, Set, Tuple

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "mechanic_fast"
# the package's own modules and its kernels; tools/ (the demo and the benchmark sweep) aside
MODULES = sorted(PACKAGE.glob("*.py")) + sorted((ROOT / "kernels").glob("*.py"))
MAX_MODULE_LINES, MAX_FUNCTION_LINES, MAX_CLASS_LINES = 350, 60, 200


def _tree(path: pathlib.Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _docstring_lines(node: ast.AST) -> int:
    body = getattr(node, "body", [])
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            return body[0].end_lineno - body[0].lineno + 1
    return 0


def _definitions(tree: ast.Module) -> Iterator[Tuple[ast.AST, int]]:
    """Every function and class with its length in lines, its docstring not counted (a public function's
    docstring is its help page)."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            yield node, node.end_lineno - node.lineno + 1 - _docstring_lines(node)


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.name)
def test_modules_functions_and_classes_stay_within_their_size_limits(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.name}: {lines} lines"
    for node, length in _definitions(_tree(path)):
        limit = MAX_CLASS_LINES if isinstance(node, ast.ClassDef) else MAX_FUNCTION_LINES
        assert length <= limit, f"{path.name}:{node.lineno} {node.name}: {length} lines (limit {limit})"


def _imports() -> Dict[str, Set[str]]:
    """Module -> the package modules it imports at module level."""
    graph: Dict[str, Set[str]] = {}
    for path in PACKAGE.glob("*.py"):
        deps: Set[str] = set()
        for node in _tree(path).body:
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                deps.update([node.module.split(".")[0]] if node.module else [a.name for a in node.names])
        graph[path.stem] = deps & {p.stem for p in PACKAGE.glob("*.py")}
    return graph


def test_no_import_cycle_and_no_import_inside_a_function_but_tritons():
    graph = _imports()
    cycles: List[List[str]] = []

    def visit(module: str, path: List[str]) -> None:
        for dep in sorted(graph.get(module, ())):
            if dep in path:
                cycles.append(path[path.index(dep) :] + [dep])
            elif len(path) < len(graph):
                visit(dep, path + [dep])

    for module in graph:
        visit(module, [module])
    assert not cycles, cycles
    late = []
    for path in PACKAGE.glob("*.py"):
        tree = _tree(path)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node not in tree.body:
                names = [node.module or ""] + [a.name for a in node.names]
                if not any(name.startswith("_triton") for name in names):  # optional: imported on demand
                    late.append((path.name, node.lineno))
    assert not late, f"package imports inside functions (a dodged cycle?): {late}"


# private torch APIs and interpreter internals: only _torch.py may use them
PRIVATE = ("_getframe", "_base", "_python_dispatch", "_dynamo", "_inductor", "_chunk_cat", "_C")


def test_torch_internals_are_used_only_in_the_torch_module():
    found = []
    for path in [p for p in PACKAGE.rglob("*.py") if p.name != "_torch.py"]:
        for node in ast.walk(_tree(path)):
            name = node.attr if isinstance(node, ast.Attribute) else None
            if isinstance(node, ast.ImportFrom) and node.module:
                name = next((part for part in node.module.split(".") if part in PRIVATE), None)
            if name in PRIVATE:
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} {name}")
    assert not found, found
