"""The probe files: `ready` only while the process says so, also across a restart."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import pytest

from sluice.ops.health import HealthFiles


def test_ready_exists_exactly_while_ready(tmp_path: Path):
    files = HealthFiles(tmp_path / "health")
    assert not (tmp_path / "health" / "ready").exists()
    files.ready(True)
    assert (tmp_path / "health" / "ready").exists()
    files.ready(False)
    assert not (tmp_path / "health" / "ready").exists()


def test_a_restarted_process_is_not_ready_until_it_says_so(tmp_path: Path):
    """A container restarted in its pod keeps the emptyDir, and the `ready` of its last run."""
    HealthFiles(tmp_path).ready(True)
    HealthFiles(tmp_path)  # the next run starts
    assert not (tmp_path / "ready").exists()


def test_alive_is_touched_at_most_once_a_heartbeat_unless_forced(tmp_path: Path):
    files = HealthFiles(tmp_path)
    files.alive()
    alive = tmp_path / "alive"
    os.utime(alive, (1_000, 1_000))
    files.alive()  # within the heartbeat: left as it is
    assert alive.stat().st_mtime == 1_000
    files.alive(force=True)
    assert alive.stat().st_mtime > 1_000


def test_no_directory_writes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Without a directory nothing is touched anywhere: not in the working directory (where a
    relative default would land), and no file is created, touched or removed at any path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SLUICE_HEALTH_DIR", raising=False)
    calls: list[str] = []

    def refuse(name: str) -> Callable[..., None]:
        def call(*args: object, **kwargs: object) -> None:
            calls.append(f"{name}{args}")
        return call

    for name in ("touch", "unlink", "mkdir", "write_text", "write_bytes", "open"):
        monkeypatch.setattr(Path, name, refuse(f"Path.{name}"))
    monkeypatch.setattr(os, "utime", refuse("os.utime"))
    monkeypatch.setattr(os, "open", refuse("os.open"))
    files = HealthFiles(None)
    files.alive(force=True)
    files.ready(True)
    files.ready(False)
    assert calls == [], f"no file touched, created or removed: {calls}"
    assert list(tmp_path.iterdir()) == [], "nothing in the working directory"
