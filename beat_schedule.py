"""Celery Beat schedule: the periodic sweeps that move sealed slot files to the object store.

Loaded by the Celery app (`tasks.app`), so `celery -A tasks beat` runs exactly this, with the
scheduler below. Each sweep is sent only while Redis holds work for it: with nothing to seal,
upload or redrive (a quiet night), Beat sends nothing to the io queue, so the io workers can be
scaled to zero (deploy/keda.yaml) as the cpu workers are, and the first batch handed over wakes
them again.
"""

from __future__ import annotations

import logging
from typing import Any

import redis
from celery.beat import PersistentScheduler, ScheduleEntry

from sluice.core import schema
from sluice.core.redis_client import get_redis
from sluice.core.settings import Settings
from sluice.ops.repair import verified

log = logging.getLogger("sluice.beat")

# Entry name -> the keys whose existence in Redis means it has work. The seal-and-upload sweep
# acts on slot files open or sealed and not yet archived, tail archives under way, and batches in
# flight (whose pieces' files it also tidies); the redrive on batches in flight.
WORK = {
    "seal-and-upload": (schema.SLOTS, schema.SEALED, schema.TAIL_PLAN, schema.INFLIGHT),
    "redrive": (schema.INFLIGHT,),
}


class WorkGatedScheduler(PersistentScheduler):
    """Celery's default scheduler, except that an entry of WORK falls due as usual but is sent
    only if Redis holds one of its keys; otherwise that tick counts as its run and it is looked
    at again an interval later. (Gating in the entry's schedule instead would starve the other
    entries: Beat only looks at the entry at the head of its heap.)"""

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        keys = WORK.get(entry.name)
        if keys is not None and not work_waits(keys):
            log.debug("nothing for %s to do; not sent", entry.name)
            return
        super().apply_entry(entry, producer=producer)


def work_waits(keys: tuple[str, ...]) -> bool:
    """Whether Redis holds any of `keys`, or a state not yet checked against the spool (a
    restarted, replaced or emptied server: the sweep's worker repairs it, sluice.ops.repair, and
    the work it restores appears); True if it does not answer (Beat's broker is that Redis, so
    the send itself waits out the outage)."""
    try:
        return bool(get_redis().exists(*keys)) or not verified(get_redis())
    except redis.RedisError:
        return True


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
