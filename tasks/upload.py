"""upload [queue io], run by Beat: seal due slot files, then one `upload_file` task per sealed file.

Uploads are network-bound: against a store 50 ms away, thousands of app-hour files an hour took
minutes one after the other in one task. Sent as tasks of their own they run on all io threads.
"""

from __future__ import annotations

import redis
from celery.utils.log import get_task_logger

from sluice.redis_client import get_redis
from sluice.settings import get_settings
from sluice.slots import SealedFile
from sluice.uploader import APP_HOUR_LEASE_SECONDS, UploadFailed, archive_one
from tasks.app import app
from tasks.deps import ledger, slots, store

log = get_task_logger(__name__)

SWEEP_LOCK = "sluice:lock:sweep"


def _queued_key(entry: str) -> str:
    """Set while an upload task for this sealed file is queued or running."""
    return f"sluice:upload-queued:{entry}"


@app.task(name="sluice.upload", autoretry_for=(redis.RedisError,), max_retries=3)
def upload() -> int:
    """Seal what is due and send an upload task for every sealed file that has none queued;
    returns how many were sent. One sweep at a time: a second Beat tick just returns."""
    settings = get_settings()
    r = get_redis()
    lock = r.lock(SWEEP_LOCK, timeout=max(30.0, settings.upload_interval_seconds * 4), blocking=False)
    if not lock.acquire():
        return 0
    try:
        ledger().drop_orphan_pieces(older_than=settings.redrive_after_seconds)
        sealed = slots().seal_due()
        sent = 0
        for file in slots().sealed_files():
            # The mark outlives a lost task by the app-hour lease at most; then a sweep resends.
            if r.set(_queued_key(file.entry), 1, nx=True, ex=APP_HOUR_LEASE_SECONDS):
                app.send_task("sluice.upload_file", args=[file.entry, file.size], queue="io")
                sent += 1
        if sealed or sent:
            log.info("sealed %d slot files, sent %d uploads", sealed, sent)
        return sent
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            log.warning("sweep outlived its lock; uploads are idempotent, so no harm done")


@app.task(name="sluice.upload_file", autoretry_for=(redis.RedisError,), max_retries=3)
def upload_file(entry: str, size: int) -> int:
    """Archive one sealed file (idempotent); a failure is logged and the next sweep resends it."""
    sealed = SealedFile.from_entry(entry, size)
    try:
        return archive_one(slots(), store(), sealed)
    except redis.RedisError:
        raise
    except Exception as exc:  # the file stays sealed; the next sweep resends it
        log.error("archiving %s failed, will retry: %s", entry, exc)
        raise UploadFailed(f"{entry} not archived yet: {exc}") from None  # shown as failed in Flower
    finally:
        get_redis().delete(_queued_key(entry))
