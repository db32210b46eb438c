"""The package's shape: layers import only downwards, no import cycles, no oversized modules or functions.

Read from the source with ``ast`` (imports inside functions count too), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "tico" / "experimental" / "quantization"
PREFIX = "tico.experimental.quantization"
# Lower layers never import higher ones. Equal ranks may import each other (a cycle is still refused below).
LAYERS = {
    "nn": 0, "config": 0, "progress": 0, "distributed": 0,
    "structure": 1, "quantizer": 1, "registry": 1,
    "public_interface": 2, "__init__": 2,
    "algorithm": 3, "export": 3,
    "evaluation": 4,
    "pipeline": 5,
    "run": 6,
    "cli": 7,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Package-relative names of the package modules ``path`` imports (``from pkg import module`` included)."""
    found = set()
    modules = {_module_name(p) for p in PACKAGE.rglob("*.py")}
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(PREFIX):
            base = node.module[len(PREFIX) + 1:]
            for alias in node.names:
                child = f"{base}.{alias.name}".lstrip(".")
                found.add(child if child in modules else base)
        elif isinstance(node, ast.Import):
            found |= {a.name[len(PREFIX) + 1:] for a in node.names if a.name.startswith(PREFIX + ".")}
    return {name for name in found if name}


GRAPH = {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _layer(module: str) -> int:
    return LAYERS[module.split(".")[0]]


def test_every_top_level_module_has_a_layer():
    assert {m.split(".")[0] for m in GRAPH} <= set(LAYERS), "add the new top-level module to LAYERS"


def test_no_upward_import():
    upward = sorted(f"{m} -> {d}" for m, deps in GRAPH.items() for d in deps
                    if m != "__init__" and _layer(d) > _layer(m))
    assert not upward, upward


def test_no_import_cycle():
    # Package __init__ files re-export their children; an edge into a package's own child is not a cycle.
    def edges(module: str) -> set[str]:
        return {d for d in GRAPH.get(module, ()) if d in GRAPH and not d.startswith(module + ".")
                and module != "__init__"}

    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        for dep in edges(module):
            if state.get(dep) == 1:
                cycles.append(stack[stack.index(dep):] + [dep] if dep in stack else [module, dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def test_no_module_or_function_too_long():
    long = []
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        if source.count("\n") > MAX_MODULE_LINES:
            long.append(f"{_module_name(path)}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{_module_name(path)}.{node.name}: {length} lines")
    assert not long, long
