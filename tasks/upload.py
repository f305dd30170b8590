"""upload [queue io], run by Beat: seal due slot files and archive everything sealed."""

from __future__ import annotations

import redis
from celery.utils.log import get_task_logger

from sluice.redis_client import get_redis
from sluice.settings import get_settings
from sluice.uploader import upload_sealed
from tasks.app import app
from tasks.deps import ledger, slots, store

log = get_task_logger(__name__)

SWEEP_LOCK = "sluice:lock:sweep"


@app.task(name="sluice.upload", autoretry_for=(redis.RedisError,), max_retries=3)
def upload() -> int:
    """One sweep at a time: a second Beat tick while the first still uploads just returns.

    The lock's lease is short and renewed after every file, so a sweep killed mid-upload
    holds up the next one for one lease at most.
    """
    settings = get_settings()
    lock = get_redis().lock(SWEEP_LOCK, timeout=max(30.0, settings.upload_interval_seconds * 4),
                            blocking=False)
    if not lock.acquire():
        return 0
    try:
        ledger().drop_orphan_pieces(older_than=settings.redrive_after_seconds)
        sealed = slots().seal_due()
        archived = upload_sealed(slots(), store(), on_progress=lock.reacquire)
        if sealed or archived:
            log.info("sealed %d slot files, archived %d", sealed, archived)
        return archived
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            log.warning("sweep outlived its lock; uploads are idempotent, so no harm done")
