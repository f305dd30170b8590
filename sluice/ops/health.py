"""Liveness and readiness as files, for probes that cost nothing (deploy/: `stat` and `test -f`
in an exec probe, instead of a Python start or a `celery inspect ping` per probe).

`alive` is touched while the process's main loop runs; `ready` exists while the process can do
its work. Both live in SLUICE_HEALTH_DIR (an emptyDir in Kubernetes); without it, nothing is
written.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

log = logging.getLogger(__name__)

# How often a process touches its `alive` file; a probe allows several periods.
HEARTBEAT_SECONDS = 10.0


class HealthFiles:
    def __init__(self, directory: Path | None) -> None:
        self.directory = directory
        self._touched = 0.0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
            # A container restarted in its pod finds the emptyDir of its last run: a `ready` left
            # there would say ready before this run is.
            self.ready(False)

    def alive(self, force: bool = False) -> None:
        """Touch `alive`, at most once per HEARTBEAT_SECONDS unless forced."""
        now = time.monotonic()
        if self.directory is None or (not force and now - self._touched < HEARTBEAT_SECONDS):
            return
        self._touched = now
        path = self.directory / "alive"
        try:
            path.touch()
            os.utime(path)
        except OSError as exc:
            log.warning("cannot touch %s (%s): the liveness probe will fail", path, exc)

    def ready(self, ok: bool) -> None:
        """`ready` exists exactly while `ok`."""
        if self.directory is None:
            return
        path = self.directory / "ready"
        try:
            if ok:
                path.touch()
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("cannot update %s (%s)", path, exc)
