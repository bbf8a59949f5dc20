"""The house's import rules, read from the source: one direction between packages and no import circles.

launcher uses tune (sweeps) and engine; tune uses engine; engine uses pruning and models; pruning and models use neither each other nor
engine; everything may use common, which uses nothing of ours. Lazy imports inside functions count too: a circle
that only closes at run time is still a circle.
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LEVEL = {"common": 0, "models": 1, "pruning": 1, "engine": 2, "tune": 3, "launcher": 4}


def _modules() -> dict[str, Path]:
    out = {}
    for package in LEVEL:
        for path in (REPO / package).rglob("*.py") if (REPO / package).is_dir() else []:
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def test_imports_flow_one_way_between_packages() -> None:
    wrong = [f"{a} imports {b}" for a, deps in _graph().items() for b in deps
             if a.split(".")[0] != b.split(".")[0] and LEVEL[b.split(".")[0]] >= LEVEL[a.split(".")[0]]]
    assert not wrong, wrong


def test_no_import_circles() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    circles: list[str] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for dep in sorted(graph[module]):
            if state.get(dep) == 1:
                circles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not circles, circles
