"""The package's import graph has no cycle: data flows one way (detector -> rewards -> trainer -> evaluation)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "mtrl"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Every ``mtrl`` module -> the ``mtrl`` modules it imports anywhere (top level or inside functions)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                while name and name not in modules:  # `from mtrl.rewards import Rewarder` -> mtrl.rewards
                    name = name.rpartition(".")[0]
                if name.startswith("mtrl") and name != mod and name != "mtrl":
                    graph[mod].add(name)
    # a package's __init__ re-exports its submodules: importing a submodule does not import a sibling
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (cycle := visit(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (cycle := visit(m)):
            return cycle
    return None


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20 and "mtrl.runner" in graph  # the walk found the package
    cycle = find_cycle({m: {n for n in deps if not m.startswith(n + ".")} for m, deps in graph.items()})
    assert cycle is None, " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_lower_layers_do_not_import_upper_ones():
    """The chain detector (spans) -> rewards -> trainer -> evaluation never reaches back up."""
    graph = import_graph()
    upper = {"mtrl.runner", "mtrl.cli", "mtrl.bench", "mtrl.recipe"}
    for lower in ("mtrl.detectors", "mtrl.rewards.alignment", "mtrl.rewards", "mtrl.policy", "mtrl.rollout"):
        reach = {n for m, deps in graph.items() if m == lower or m.startswith(lower + ".") for n in deps}
        assert not reach & upper, f"{lower} imports {reach & upper}"
        assert "mtrl.algorithms" not in reach or lower == "mtrl.algorithms"


def test_detectors_do_not_import_rewards():
    """Spans are what a detector returns; the rewards read them, never the other way round."""
    graph = import_graph()
    reach = {n for m, deps in graph.items() if m.startswith("mtrl.detectors") for n in deps}
    assert "mtrl.detectors.spans" in reach
    assert not {n for n in reach if n.startswith("mtrl.rewards")}
