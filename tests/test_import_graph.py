"""No import cycles among the project's modules, counting imports inside functions and under TYPE_CHECKING.

A cycle that works today only because one side imports lazily (or only for type checkers) still ties
two modules together: each needs the other to be understood, and moving the lazy import to the top
breaks the import. The graph is read from the source with ``ast`` (nothing is imported), so the test
is fast and sees every import statement, wherever it is.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("autoregressive", "dataset", "evaluations", "scripts", "tokenizer", "utils")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def imported_modules(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """Project modules that ``path`` imports anywhere in its body.

    ``from package import name`` counts as importing ``package.name`` when that is a module, else
    ``package`` (its ``__init__``). Importing ``a.b`` does not count as importing ``a``: Python
    initialises a parent package before its submodule, whatever the parent imports.
    """
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                found.add(candidate if candidate in modules else source)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_lazy_and_type_checking_imports():
    graph = import_graph()
    assert "autoregressive.model" in graph["autoregressive.stream"]  # under TYPE_CHECKING only
    assert "autoregressive.train" in graph["scripts.estimate_memory"]  # inside a function


def test_cycle_detection_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_among_project_modules():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_gpt_loading_builds_no_model():
    """autoregressive.loading reads and converts state dicts; the model module depends on it, not back."""
    graph = import_graph()
    assert "autoregressive.loading" in graph["autoregressive.model"]
    assert not {"autoregressive.model", "autoregressive"} & graph["autoregressive.loading"]
    assert "tokenizer.model" not in graph["tokenizer.loading"]
