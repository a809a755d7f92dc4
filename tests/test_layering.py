"""The house rules, read from the code's imports: three wings with one-way doors, no circles.

- vqmodel (the torch model library) imports neither training nor service;
- service (the torch-free runtime) imports neither torch, vqmodel nor training;
- training may import vqmodel and only the torch-free contract pieces of service;
- no module imports itself back through others (a circle), lazy imports included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("vqmodel", "service", "training")
FORBIDDEN = {
    "vqmodel": ("training", "service"),
    "service": ("torch", "vqmodel", "training", "torchvision", "safetensors"),
    "training": (),
}
# what training may use of the runtime: the model folder, the image policy, the engine (parity),
# atomic writes, the error type and the one-line CLI parser; none of them may pull in the web stack
TRAINING_MAY_IMPORT = {
    "service.model_dir",
    "service.images",
    "service.engine",
    "service.files",
    "service.problems",
    "service.cli_parser",
}
WEB_STACK = ("fastapi", "starlette", "uvicorn", "pydantic_settings", "anyio")
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (functions' lazy imports included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return imports_in(path.read_text(), package)


def imports_in(source: str, package: str) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from .x import y inside `package`
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base]) if base else ".".join(anchor)
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def modules() -> dict[str, Path]:
    return {
        module_name(path): path
        for package in PACKAGES
        for path in sorted((REPO / package).rglob("*.py"))
    }


def internal_graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: {m for m in imports_of(path) if m in known and m != name}
        for name, path in known.items()
    }


@pytest.mark.parametrize("package", PACKAGES)
def test_no_forbidden_imports(package: str) -> None:
    bad = []
    for name, path in modules().items():
        if name.split(".")[0] != package:
            continue
        for imported in imports_of(path):
            top = imported.split(".")[0]
            if top in FORBIDDEN[package]:
                bad.append(f"{name} imports {imported}")
            if package == "training" and top == "service" and not _contract_piece(imported):
                bad.append(f"{name} imports {imported} (not a torch-free contract piece)")
    assert not bad, "\n".join(bad)


def test_contract_pieces_need_no_web_stack() -> None:
    # `pip install vqtok[train]` has no FastAPI: what training imports of service, and everything
    # those modules import in turn, must load without it
    graph, known = internal_graph(), modules()
    seen, todo = set(), list(TRAINING_MAY_IMPORT)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo.extend(graph.get(name, ()))
    bad = [
        f"{name} imports {imported}"
        for name in sorted(seen)
        for imported in imports_of(known[name])
        if imported.split(".")[0] in WEB_STACK
    ]
    assert not bad, "\n".join(bad)


def _contract_piece(imported: str) -> bool:
    return imported == "service" or any(
        imported == ok or imported.startswith(ok + ".") for ok in TRAINING_MAY_IMPORT
    )


def test_no_circles() -> None:
    graph = internal_graph()
    circles = [component for component in strongly_connected(graph) if len(component) > 1]
    assert not circles, circles


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return components


def test_the_rules_see_a_forbidden_edge_and_a_circle() -> None:
    # the checks above must be able to fail: a circle, and lazy + relative imports
    graph = {"a": {"b"}, "b": {"a"}, "c": set()}
    assert sorted(strongly_connected(graph)) == [["a", "b"], ["c"]]
    source = "def f():\n    import torch\n    from ..vqmodel.vqvae import VQVAE\n"
    found = imports_in(source, "service.sub")
    assert {"torch", "service.vqmodel.vqvae", "service.vqmodel.vqvae.VQVAE"} <= found
    assert imports_in("from vqmodel import VQVAE\n", "service") >= {"vqmodel", "vqmodel.VQVAE"}


@pytest.mark.parametrize("package", PACKAGES)
def test_no_function_is_longer_than_a_screen(package: str) -> None:
    long = []
    for name, path in modules().items():
        if name.split(".")[0] != package:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{name}.{node.name}: {length} lines")
    assert not long, "\n".join(long)
