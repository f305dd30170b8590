"""The import graph is layered: no cycles, and no package imports one above it.

Layers, lowest first: the library's stages in the order of the flow (docs/DESIGN.md), then what
runs them: sluice.core (shared by every stage) < sluice.formats < sluice.handover < sluice.slots <
sluice.archive < sluice.query < sluice.ops < sluice.cli < tasks (Celery; beat_schedule with it) <
bridge (it sends tasks) < devstack (the local stack) < bench, tests.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = [["sluice", "sluice.core"], ["sluice.formats"], ["sluice.handover"], ["sluice.slots"], ["sluice.archive"],
          ["sluice.query"], ["sluice.ops"], ["sluice.cli"], ["tasks", "beat_schedule"], ["bridge"], ["devstack"],
          ["bench", "tests"]]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}
TOP = ["sluice", "beat_schedule", "tasks", "bridge", "devstack", "bench", "tests"]


def layer(module: str) -> str:
    """The layer a module belongs to: its subpackage of sluice, or its top-level package."""
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "sluice" and len(parts) > 1 else parts[0]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports() -> dict[str, set[str]]:
    """Every project module and the project modules it imports (at any depth in its code)."""
    paths = [p for top in TOP for p in ([ROOT / f"{top}.py"] if (ROOT / f"{top}.py").exists()
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
    wrong = [(m, t) for m, targets in imports().items() for t in targets if RANK[layer(t)] > RANK[layer(m)]]
    assert not wrong, wrong


def test_every_library_module_sits_in_a_stage():
    """sluice/ holds its stages' subpackages and the `sluice` command, nothing else: a new module
    goes into the stage it serves (or sluice.core, if every stage needs it)."""
    graph = imports()
    assert all(layer(m) in RANK for m in graph), sorted(m for m in graph if layer(m) not in RANK)
    subpackages = {p.name for p in (ROOT / "sluice").iterdir() if (p / "__init__.py").exists()}
    assert {f"sluice.{name}" for name in subpackages} == {n for names in LAYERS for n in names
                                                           if n.startswith("sluice.") and n != "sluice.cli"}
    assert sorted(p.name for p in (ROOT / "sluice").glob("*.py")) == ["__init__.py", "cli.py"]


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


def test_the_benchmarks_and_the_local_stack_import():
    """No test runs bench/ or every module of devstack/: importing each finds a name that moved
    (as `from sluice import schema` did when sluice/ got its subpackages)."""
    import importlib

    for top in ("bench", "devstack"):
        for path in sorted((ROOT / top).glob("*.py")):
            importlib.import_module(module_name(path))
