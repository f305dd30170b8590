"""An earlier release of sluice, checked out beside this one with its own virtualenv, so that an
upgrade test runs the real old code against the new (tests/integration/test_upgrades.py) instead
of today's code pretending to be another version."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent

# The commit of the last release before this one: the old side of the cross-release upgrade test.
# Each release moves it forward to the commit that landed before it.
PREVIOUS_RELEASE = "dedb57b2ef244bfb661cc4cb4f400add6b974cbc"


@dataclass(frozen=True)
class Release:
    """Where a release's code lies and the interpreter (with its packages) that runs it."""

    root: Path
    python: str

    def env(self, env: dict[str, str]) -> dict[str, str]:
        """`env` for a process of this release: for another release's, no PYTHONPATH, which could
        bring in this release's code."""
        if self.root == PROJECT_ROOT:
            return env
        return {k: v for k, v in env.items() if k != "PYTHONPATH"}


CURRENT = Release(PROJECT_ROOT, sys.executable)


def install(commit: str, dest: Path) -> Release:
    """The tree of `commit` in `dest` (git archive: the repository's worktrees stay as they are)
    and a virtualenv in `dest/.venv` with that release's runtime packages, installed by uv."""
    known = subprocess.run(["git", "-C", str(PROJECT_ROOT), "cat-file", "-e", f"{commit}^{{commit}}"],
                           capture_output=True)
    if known.returncode != 0:
        raise RuntimeError(f"commit {commit} is not in this clone; the upgrade test needs the project's history "
                           "(a full clone, not --depth)")
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest.parent / f"{dest.name}.tar"
    subprocess.run(["git", "-C", str(PROJECT_ROOT), "archive", "-o", str(archive), commit], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(dest, filter="data")
    archive.unlink()
    uv = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if uv is None:
        raise RuntimeError("uv is not installed (scripts/setup.sh installs it into .venv)")
    venv = dest / ".venv"
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True, env=env)
    python = str(venv / "bin" / "python")
    subprocess.run([uv, "pip", "install", "-q", "--python", python, "--compile-bytecode", str(dest)],
                   check=True, env=env)
    return Release(dest, python)
