"""The folder layout is the data flow, and the imports keep it: a package imports only the ones
below it (docs/architecture.md), and no module imports its way back to itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "graphwise"

# What each package may import of graphwise (besides itself). The bottom: core, kernels,
# distributed (ranks and groups), the one-file modules config, sampling_params, outputs.
BASE = {"config", "sampling_params", "outputs", "core"}
ALLOWED: dict[str, set[str]] = {
    "core": {"sampling_params"},
    "kernels": set(),
    "distributed": set(),
    "layers": BASE | {"kernels", "distributed"},
    "models": BASE | {"layers", "kernels", "distributed"},
    "runner": BASE | {"models", "layers", "kernels", "distributed"},
    "executor": BASE | {"runner", "models", "layers", "distributed"},
    "engine": BASE | {"executor", "runner", "models", "distributed", "tokenizer"},
    # The top: the APIs and the tools that measure and explain.
    "llm": BASE | {"engine", "executor", "tokenizer"},
    "server": BASE | {"engine", "executor", "models", "tokenizer"},
    "commands": BASE | {"llm", "tokenizer"},
}


def _imports(tree: ast.AST, all_levels: bool) -> set[str]:
    """graphwise modules imported; module level only (not in functions or TYPE_CHECKING)
    unless `all_levels`."""
    found: set[str] = set()

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                nested = True
            if top or all_levels:
                if isinstance(child, ast.ImportFrom) and (child.module or "").startswith(
                    "graphwise"
                ):
                    found.add(child.module)  # type: ignore[arg-type]
                elif isinstance(child, ast.Import):
                    found.update(a.name for a in child.names if a.name.startswith("graphwise."))
            visit(child, top and not nested)

    visit(tree, True)
    return found


def _modules() -> dict[str, ast.AST]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = ast.parse(path.read_text())
    return out


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "graphwise"


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_packages_import_only_what_lies_below_them(package: str) -> None:
    wrong = set()
    for name, tree in _modules().items():
        if _package(name) != package:
            continue
        for imported in _imports(tree, all_levels=True):
            target = _package(imported)
            if target != package and target not in ALLOWED[package]:
                wrong.add(f"{name} -> {imported}")
    assert not wrong, sorted(wrong)


def test_no_import_cycles_between_modules() -> None:
    modules = _modules()
    graph = {
        name: {m for m in _imports(tree, all_levels=False) if m in modules and m != name}
        for name, tree in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def walk(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt) :] + [nxt])
            elif nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, cycles[:3]
