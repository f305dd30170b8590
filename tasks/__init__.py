"""The Celery side of sluice: `celery -A tasks worker|beat|flower` finds `tasks.app`."""

from tasks.app import app

__all__ = ["app"]
