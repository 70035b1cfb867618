"""The dependency rule (DESIGN.md, docs/architecture.md), read from the source: every module-to-module
import, function-level ones included (a lazy import is still a dependency), of ``textgen/`` and of the
top-level ``main.py`` and ``models.py``.

- Every module sits in a layer (``LAYERS``: module prefix -> layer, longest prefix wins); a module that
  matches no entry fails the test, so a new module must be placed.
- A module imports only from its own layer or below; nothing under ``textgen/`` imports ``models.py``
  (the original design's re-export of ``textgen.api.schemas``) or ``textgen.api`` from below the HTTP
  layer.
- No cycles: the graph's strongly connected components are all single modules.
- The job-store contract and the storage layer import no backend.
"""

from __future__ import annotations

import ast
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "textgen"
TOP_LEVEL = ("main.py", "models.py")  # the HTTP layer's files outside the package

# The layers, bottom (1) to top (8), as in DESIGN.md's "Dependency rule".
BASE, ACCESS, ENGINE, STORES, GENERATION, ORCHESTRATION, STATE, HTTP = range(1, 9)
LAYER_NAMES = {
    BASE: "config · errors · threads · cpu_share · logging · jobs/states",
    ACCESS: "access · storage/ · content_filter · loader",
    ENGINE: "engine/",
    STORES: "job/batch stores + backends · ratelimit · webhooks · metrics",
    GENERATION: "generation.py",
    ORCHESTRATION: "runner · coordinator · services/ (OpenAI translation, batch lines) · workers/",
    STATE: "state.py",
    HTTP: "main.py · api/ · models.py",
}
# Module prefix -> layer; the longest matching prefix wins.
LAYERS: dict[str, int] = {
    "main": HTTP,
    "models": HTTP,
    "textgen.api": HTTP,
    "textgen.state": STATE,
    "textgen.services": ORCHESTRATION,
    # The leased poll loop and what runs on it: the job runner, the batch coordinator, webhook delivery.
    "textgen.workers": ORCHESTRATION,
    "textgen.generation": GENERATION,
    "textgen.jobs.store": STORES,
    "textgen.jobs.sqlite_store": STORES,
    "textgen.jobs.redis_store": STORES,
    "textgen.jobs.view": STORES,
    "textgen.batches": STORES,
    "textgen.batches.store": STORES,
    "textgen.batches.sqlite_store": STORES,
    "textgen.batches.redis_store": STORES,
    "textgen.batches.files": STORES,
    "textgen.batches.view": STORES,
    "textgen.backends": STORES,
    "textgen.ratelimit": STORES,
    "textgen.webhooks": STORES,
    "textgen.metrics": STORES,
    "textgen.engine": ENGINE,
    "textgen.access": ACCESS,
    "textgen.storage": ACCESS,
    "textgen.content_filter": ACCESS,
    "textgen.loader": ACCESS,
    "textgen.gguf_file": ACCESS,  # GGUF read directly: the file, its block formats, a model from them
    "textgen.gguf_formats": ACCESS,
    "textgen.gguf_model": ACCESS,
    "textgen": BASE,  # the package's __init__ (OpenMP set-up before torch loads)
    "textgen.config": BASE,
    "textgen.errors": BASE,
    "textgen.threads": BASE,
    "textgen.logging": BASE,
    "textgen.jobs": BASE,  # the package's empty __init__
    "textgen.jobs.states": BASE,
    "textgen.json_limits": BASE,
    "textgen.openmp": BASE,
    "textgen.cpu_share": BASE,
}


def layer_of(module: str) -> int | None:
    """The layer of the longest prefix in ``LAYERS`` that names ``module`` or a package above it."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        layer = LAYERS.get(".".join(parts[:end]))
        if layer is not None:
            return layer
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
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


def source_files() -> dict[str, Path]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    files.update({module_name(ROOT / name): ROOT / name for name in TOP_LEVEL})
    return files


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    modules = set(files)
    return {name: imports_of(path, name, modules) for name, path in files.items()}


def upward_imports(graph: dict[str, set[str]]) -> dict[str, list[str]]:
    """Each module's imports of a module in a higher layer."""
    found: dict[str, list[str]] = {}
    for module, targets in graph.items():
        own = layer_of(module)
        assert own is not None, module
        above = sorted(target for target in targets if (layer_of(target) or 0) > own)
        if above:
            found[module] = above
    return found


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


def test_the_rule_checker_finds_an_upward_import() -> None:
    """The checks below would pass vacuously if the walk or the layer lookup were broken."""
    assert layer_of("textgen.engine.core.fused") == ENGINE
    assert layer_of("textgen.workers.coordinator") == ORCHESTRATION
    assert layer_of("textgen.batches.store") == STORES
    assert layer_of("textgen.workers.loop") == ORCHESTRATION
    assert layer_of("textgen.api.schemas.native") == HTTP
    assert layer_of("models") == HTTP
    assert layer_of("elsewhere") is None
    graph = {
        "textgen.generation": {"textgen.api.schemas.native", "textgen.engine.types"},
        "textgen.engine.types": set(),
    }
    assert upward_imports(graph) == {"textgen.generation": ["textgen.api.schemas.native"]}
    lazy = "def f():\n    from models import TextGenerationRequest\n"
    assert "models" in imports_of_text(lazy, "textgen.generation", {"models", "textgen.generation"})


def imports_of_text(source: str, name: str, modules: set[str]) -> set[str]:
    """``imports_of`` on source text (the checker's own test)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "module.py"
        path.write_text(source, encoding="utf-8")
        return imports_of(path, name, modules)


def test_textgen_has_no_import_cycle() -> None:
    graph = import_graph()
    assert "textgen.jobs.store" in graph and "textgen.storage.url" in graph  # the walk saw the package
    assert "models" in graph and "main" in graph
    assert cycles(graph) == []


def test_every_module_has_a_layer() -> None:
    """A new module must be placed in ``LAYERS`` (and so in the dependency rule) before it can land."""
    assert sorted(module for module in import_graph() if layer_of(module) is None) == []


def test_every_module_imports_only_its_layer_or_below() -> None:
    offenders = upward_imports(import_graph())
    described = {
        module: [f"{target} ({LAYER_NAMES[layer_of(target) or 0]})" for target in targets]
        for module, targets in offenders.items()
    }
    assert described == {}


def test_nothing_in_textgen_imports_models_and_nothing_below_the_api_imports_it() -> None:
    """``models.py`` is the outside world's import surface; the package (its routes included) uses
    ``textgen.api.schemas``, so ``textgen`` stands alone."""
    graph = import_graph()
    offenders = {
        module: sorted(
            target
            for target in targets
            if target == "models" or (target.startswith("textgen.api") and not module.startswith("textgen.api"))
        )
        for module, targets in graph.items()
        if module.startswith("textgen")
    }
    assert {module: targets for module, targets in offenders.items() if targets} == {}


def test_models_is_a_pure_re_export() -> None:
    """The original import surface: it defines nothing and imports only the package's schemas."""
    tree = ast.parse((ROOT / "models.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            assert node.module == "__future__" or (node.module or "").startswith("textgen.api.schemas."), node.module
        else:
            assert isinstance(node, (ast.Expr, ast.Assign)), ast.dump(node)  # the docstring and __all__
            if isinstance(node, ast.Assign):
                assert [target.id for target in node.targets if isinstance(target, ast.Name)] == ["__all__"]


def test_the_store_contract_and_storage_import_no_backend() -> None:
    graph = import_graph()
    backends = {"textgen.jobs.sqlite_store", "textgen.jobs.redis_store", "textgen.ratelimit", "textgen.backends"}
    assert not graph["textgen.jobs.store"] & backends
    for module in ("textgen.storage.url", "textgen.storage.sqlite", "textgen.storage.redis"):
        assert not {target for target in graph[module] if target.startswith("textgen.jobs")} | (
            graph[module] & backends
        ), module


def test_no_two_classes_share_a_name() -> None:
    """One name per concept (issue 21): a class name in ``textgen/`` names one class, so a reader (or a
    grep) never has to ask which ``Batch`` or ``FileObject`` is meant."""
    homes: dict[str, list[str]] = {}
    for module, path in source_files().items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef):
                homes.setdefault(node.name, []).append(module)
    assert {name: modules for name, modules in homes.items() if len(modules) > 1} == {}


def test_the_schemas_load_without_the_engine() -> None:
    """``models.py`` and ``textgen.api.schemas`` are Pydantic only: a client or a docs script importing
    them must not load the engine (and with it torch)."""
    graph = import_graph()
    reached, todo = set(), ["models"]
    while todo:
        module = todo.pop()
        if module not in reached:
            reached.add(module)
            todo.extend(graph[module])
    assert sorted(m for m in reached if m.startswith(("textgen.engine", "textgen.generation", "textgen.loader"))) == []
