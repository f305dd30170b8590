"""The import graph is layered: no cycles, and no package imports one above it.

Packages, lowest first: sluice (the library) < tasks (Celery) < bridge (it sends tasks) <
devstack (the local stack) < bench, tests. beat_schedule sits with tasks.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RANK = {"sluice": 0, "beat_schedule": 1, "tasks": 1, "bridge": 2, "devstack": 3, "bench": 4, "tests": 4}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """Every project module and the project modules it imports (at any depth in its code)."""
    paths = [p for top in RANK for p in ([ROOT / f"{top}.py"] if (ROOT / f"{top}.py").exists()
                                          else (ROOT / top).rglob("*.py"))]
    modules = {module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            found.update(t for t in targets if t in modules and t != name)
        graph[name] = found
    return graph


def test_no_package_imports_one_above_it():
    wrong = [(m, t) for m, targets in imports().items() for t in targets
             if RANK[t.split(".")[0]] > RANK[m.split(".")[0]]]
    assert not wrong, wrong


def test_the_runtime_never_imports_the_development_stack():
    runtime = {m: t for m, t in imports().items() if m.split(".")[0] in ("sluice", "tasks", "bridge", "beat_schedule")}
    wrong = [(m, t) for m, targets in runtime.items() for t in targets
             if t.split(".")[0] in ("devstack", "bench", "tests")]
    assert not wrong, wrong


def test_no_import_cycles():
    graph = imports()
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        for target in sorted(graph[module]):
            if not (target.split(".")[0] == "tests"):  # test modules import each other's helpers
                visit(target, path + [module])
        done.add(module)

    for module in sorted(graph):
        visit(module, [])
