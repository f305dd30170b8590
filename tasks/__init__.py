"""The Celery side of sluice: `celery -A tasks worker|beat|flower` finds `tasks.app`."""

from tasks import health  # noqa: F401 - the worker's start-up check and heartbeat bootstep
from tasks.app import app

__all__ = ["app"]
