"""Celery Beat schedule: the periodic sweeps that move sealed slot files to the object store.

Loaded by the Celery app (`tasks.app`), so `celery -A tasks beat` runs exactly this.
"""

from __future__ import annotations

from typing import Any

from sluice.settings import Settings


def beat_schedule(settings: Settings, headers: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`headers`: sent with every task (sluice's protocol version, tasks.app)."""
    return {
        # Seal idle or full slot files, upload them, verify, delete the local copy.
        "seal-and-upload": {
            "task": "sluice.upload",
            "schedule": settings.upload_interval_seconds,
            "options": {"queue": "io", "expires": settings.upload_interval_seconds, "headers": headers},
        },
        # Re-enqueue the remaining work of batches in flight for too long (a lost task).
        "redrive": {
            "task": "sluice.redrive",
            "schedule": max(settings.redrive_after_seconds / 2, 1.0),
            "options": {"queue": "io", "expires": settings.redrive_after_seconds, "headers": headers},
        },
    }
