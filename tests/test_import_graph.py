"""No import cycles among the project's modules, counting imports inside functions (a cycle hidden in a function
body is still a cycle: neither module can be read, tested or moved without the other)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("grpo_kernels", "grpo", "bench")

# Known cycles, each as the loop of imports it closes, until the change that removes them lands; then delete the
# entry. The test ignores exactly these edges; a listed loop whose edges are no longer all there fails the test,
# so the list cannot go stale.
ALLOWED_CYCLES = [
]


def loop_edges(loop: tuple) -> set[tuple[str, str]]:
    return {(a, loop[(i + 1) % len(loop)]) for i, a in enumerate(loop)}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """Project modules that `path` imports anywhere in its body (relative imports resolved). `from pkg import name`
    counts pkg.name when that is a module, else pkg."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for t in targets:
            # `import a.b.c` also runs a and a.b: the nearest project module is the edge's end
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    known = {module_name(p) for p in files}
    return {module_name(p): imported_modules(p, known) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each listed as a path around it."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def describe(comp: list[str], graph: dict[str, set[str]]) -> str:
    members = set(comp)
    return "; ".join(f"{m} -> {', '.join(sorted(graph[m] & members))}" for m in comp)


def test_the_graph_sees_imports_inside_functions_and_relative_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "bench"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("from bench import a\n")
    (pkg / "c.py").write_text("from . import b\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "PACKAGES", ("bench",))
    graph = import_graph()
    assert graph["bench.a"] == {"bench.b"} and graph["bench.b"] == {"bench.a"} and graph["bench.c"] == {"bench.b"}
    assert cycles(graph) == [["bench.a", "bench.b"]]


def test_no_import_cycles():
    graph = import_graph()
    gone = [loop for loop in ALLOWED_CYCLES if any(b not in graph.get(a, ()) for a, b in loop_edges(loop))]
    assert not gone, f"these cycles are gone: remove them from ALLOWED_CYCLES: {gone}"
    allowed = set().union(*(loop_edges(loop) for loop in ALLOWED_CYCLES))
    rest = {a: {b for b in bs if (a, b) not in allowed} for a, bs in graph.items()}
    found = cycles(rest)
    assert not found, "import cycles: " + " | ".join(describe(c, rest) for c in found)


@pytest.mark.parametrize("package", ["bench"])
def test_package_is_cycle_free(package):
    graph = import_graph()
    bad = [describe(c, graph) for c in cycles(graph) if any(m.split(".")[0] == package for m in c)]
    assert not bad, f"import cycles in {package}: " + " | ".join(bad)


def private_imports(path: Path) -> list[str]:
    """`from <project module> import _name` in `path`: a reach-in past another module's public names."""
    known = {module_name(p) for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").split(".")[0] in PACKAGES):
            found += [f"{'.' * node.level}{node.module or ''}.{a.name}" for a in node.names
                      if a.name.startswith("_") and a.name != "__future__" and f"{node.module}.{a.name}" not in known]
    return found


@pytest.mark.parametrize("module", ["strategies", "chunk_driver", "loss_totals", "vocab_parallel", "torch_ops"])
def test_loss_drivers_import_no_private_names(module):
    """The chunked strategy and the vocab-parallel path share public names (chunk_driver, loss_totals)."""
    assert private_imports(ROOT / "grpo_kernels" / f"{module}.py") == []
