"""The library's shape, read from its source with `ast`: no import cycle between the files of a package (every
import counts, those inside functions and under `if TYPE_CHECKING` too), and no library module over 600 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MAX_LINES = 600


def module_name(package: str, path: Path) -> str:
    """merge_core/methods.py -> merge_core.methods; a package's __init__.py is the package itself."""
    parts = path.relative_to(ROOT / package).with_suffix("").parts
    return ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))


def imported_modules(tree: ast.Module, module: str, is_package: bool) -> set[str]:
    """Every module name an import statement anywhere in the file reads: `import a.b`, `from a import b` (a, and
    a.b in case b is a module), relative imports resolved against `module`."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                source = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                source = node.module or ""
            names.add(source)
            names.update(f"{source}.{alias.name}" for alias in node.names)
    return names


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of the same package it imports by name (`from evals.base import x` reads evals.base; the
    package's __init__ only where it is named itself: `from evals import x`)."""
    files = {module_name(package, p): p for p in sorted((ROOT / package).rglob("*.py"))}
    graph = {}
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        imported = imported_modules(tree, module, path.name == "__init__.py")
        graph[module] = {m for m in imported if m in files and m != module}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


PACKAGES = ["merge_core", "search_spaces", "evals", "evolve"]


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycle_between_the_files_of_a_package(package: str) -> None:
    cycle = find_cycle(import_graph(package))
    assert cycle is None, f"{package}: import cycle {' -> '.join(cycle or [])}"


def test_the_cycle_finder_sees_a_cycle_and_a_function_level_import() -> None:
    source = "import x.a\ndef f():\n    from x import c\n"
    assert imported_modules(ast.parse(source), "x.b", False) >= {"x.a", "x.c"}
    assert imported_modules(ast.parse("from . import a\nfrom .c import d\n"), "x.b", False) >= {"x.a", "x.c"}
    assert find_cycle({"x.a": {"x.b"}, "x.b": {"x.c"}, "x.c": {"x.a"}}) == ["x.a", "x.b", "x.c", "x.a"]
    assert find_cycle({"x.a": {"x.b"}, "x.b": set()}) is None


@pytest.mark.parametrize("package", PACKAGES)
def test_no_library_module_over_600_lines(package: str) -> None:
    long = {
        str(path.relative_to(ROOT)): n
        for path in sorted((ROOT / package).rglob("*.py"))
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"
