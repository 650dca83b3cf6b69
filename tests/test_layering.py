"""The package's imports point down its layers: no cycles, no upward edges, no hidden function-level imports.

The layers, lowest first (docs/architecture.md): options -> reference -> kernels -> bitpack -> ops -> nn -> arch ->
convert -> recipe -> export -> the package root. A module may import modules of lower layers and, without a cycle,
modules of its own layer. Function-level imports are allowed only for optional dependencies (OPTIONAL).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = {"triton_bq": ROOT / "triton_bq", "triton_bq.kernels": ROOT / "kernels"}
LAYERS = (
    "triton_bq.options",
    "triton_bq.reference",
    "triton_bq.kernels",
    "triton_bq.bitpack",
    "triton_bq.ops",
    "triton_bq.nn",
    "triton_bq.arch",
    "triton_bq.convert",
    "triton_bq.recipe",
    "triton_bq.export",
    "triton_bq",
)
# Packages that may be imported inside a function because the package works without them.
OPTIONAL = ("matplotlib", "wandb", "tensorboard", "torch.utils.tensorboard")


def module_files() -> dict[str, Path]:
    files = {}
    for package, folder in SOURCES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            files[".".join((package, *parts))] = path
    return files


def layer_of(module: str) -> int:
    """Index of the most specific layer prefix of ``module``."""
    best = None
    for index, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(LAYERS[best]):
                best = index
    assert best is not None, module
    return best


def resolve(node: ast.ImportFrom, module: str, is_package: bool, known: set[str]) -> list[str]:
    """The project modules an ``from ... import ...`` statement loads."""
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = []
    for alias in node.names:
        candidate = f"{target}.{alias.name}"
        found.append(candidate if candidate in known else target)
    return [name for name in found if name in known]


def import_graph() -> tuple[dict[str, set[str]], list[str]]:
    """Edges module -> imported project modules, and the function-level imports that are not optional."""
    files = module_files()
    known = set(files)
    edges: dict[str, set[str]] = {name: set() for name in files}
    nested: list[str] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
                project = [name for name in targets if name in known]
            elif isinstance(node, ast.ImportFrom):
                targets = [node.module or ""]
                project = resolve(node, module, is_package, known)
            else:
                continue
            if id(node) not in top_level and not all(target.startswith(OPTIONAL) for target in targets):
                nested.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {', '.join(targets)}")
            edges[module].update(name for name in project if name != module)
    return edges, nested


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycles():
    edges, _ = import_graph()
    assert find_cycle(edges) is None, " -> ".join(find_cycle(edges))


def test_imports_point_down_the_layers():
    edges, _ = import_graph()
    upward = [
        f"{source} ({LAYERS[layer_of(source)]}) imports {target} ({LAYERS[layer_of(target)]})"
        for source, targets in edges.items()
        for target in targets
        # A package's __init__ re-exports its own modules: an edge into its own sub-tree is not upward.
        if layer_of(target) > layer_of(source) and not target.startswith(source + ".")
    ]
    assert not upward, "\n".join(upward)


def test_no_function_level_imports_of_required_packages():
    _, nested = import_graph()
    assert not nested, "\n".join(nested)


@pytest.mark.parametrize(
    "edges, expected",
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, None),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
    ],
    ids=["chain", "two-cycle", "inner-cycle"],
)
def test_cycle_finder(edges, expected):
    assert find_cycle(edges) == expected


def test_layers_cover_every_module():
    for module in module_files():
        layer_of(module)
