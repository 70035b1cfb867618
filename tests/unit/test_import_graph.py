"""The import graph of ``textgen/`` has no cycle: every module-to-module import (function-level ones
included, since a lazy import is still a dependency) is read from the source, and the graph's strongly
connected components must all be single modules. Also: nothing below ``textgen.api`` imports it, and
the job-store contract imports no backend."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "textgen"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            candidates = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in modules:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                found.add(candidate)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    modules = set(files)
    return {name: imports_of(path, name, modules) for name, path in files.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_textgen_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "textgen.jobs.store" in graph and "textgen.storage.url" in graph  # the walk saw the package
    assert cycles(graph) == []


def test_nothing_below_the_api_imports_it() -> None:
    graph = import_graph()
    offenders = {
        module: sorted(target for target in targets if target.startswith("textgen.api"))
        for module, targets in graph.items()
        if not module.startswith("textgen.api")
    }
    assert {module: targets for module, targets in offenders.items() if targets} == {}


def test_the_store_contract_and_storage_import_no_backend() -> None:
    graph = import_graph()
    backends = {"textgen.jobs.sqlite_store", "textgen.jobs.redis_store", "textgen.ratelimit", "textgen.backends"}
    assert not graph["textgen.jobs.store"] & backends
    for module in ("textgen.storage.url", "textgen.storage.sqlite", "textgen.storage.redis"):
        assert not {target for target in graph[module] if target.startswith("textgen.jobs")} | (
            graph[module] & backends
        ), module
