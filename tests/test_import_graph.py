"""No import cycles inside `m2m`: the package graph is a DAG, function-level imports included.

A cycle hidden behind a function-level import still couples two modules both ways; the graph is
computed from the source (ast), so the test sees every `import` statement wherever it is, except
those under ``if TYPE_CHECKING:`` (annotations only: they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in (SRC / "m2m").rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(), str(path))
        typing_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If) and _is_type_checking(block.test)
                       for stmt in block.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):  # a package's own __init__ is not an edge back
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_library_carries_no_benchmark_or_demo_code():
    """Benchmarks, the demo and its data live in ./benchmarks (the m2m-bench package), not in src/m2m."""
    src = Path(__file__).resolve().parents[1] / "src" / "m2m"
    assert not (src / "bench").exists() and not (src / "datasets.py").exists() and not (src / "cli" / "demo.py").exists()
    text = "\n".join(p.read_text() for p in src.rglob("*.py"))
    assert "import m2m_bench" not in text and "from m2m_bench" not in text


def test_the_lake_package_imports_neither_the_stream_nor_export_nor_ray():
    # the lake sits below the stream and Ray: lake methods reach them through m2m.plugins, which the
    # m2m package fills (m2m._wiring); function-level imports count too
    graph = import_graph()
    banned = ("m2m.stream", "m2m.export", "m2m.ray")
    found = {(mod, t) for mod, targets in graph.items() if mod == "m2m.lake" or mod.startswith("m2m.lake.")
             for t in targets if any(t == b or t.startswith(b + ".") for b in banned)}
    assert not found, sorted(found)
