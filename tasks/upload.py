"""upload [queue io], run by Beat: seal due slot files, then one `upload_file` task per sealed file.

Uploads are network-bound: against a store 50 ms away, thousands of app-hour files an hour took
minutes one after the other in one task. Sent as tasks of their own they run on all io threads.
"""

from __future__ import annotations

import uuid

import redis
from celery.utils.log import get_task_logger

from sluice.redis_client import get_redis
from sluice.settings import get_settings
from sluice.slots import SealedFile
from sluice.ledger import QUEUED_TTL_SECONDS
from sluice.uploader import UploadFailed, app_hour_lock_key, archive_one
from tasks.app import app, waiting_task_ids
from tasks.deps import ledger, slots, store

log = get_task_logger(__name__)

SWEEP_LOCK = "sluice:lock:sweep"


def _queued_key(entry: str) -> str:
    """The id of the last upload task sent for this sealed file."""
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
        files = slots().sealed_files()
        with r.pipeline(transaction=False) as pipe:  # one round trip, however many files wait
            for file in files:
                pipe.get(_queued_key(file.entry))
                pipe.exists(app_hour_lock_key(file.app, file.hour))
            replies = pipe.execute() if files else []
        queued, busy = replies[0::2], replies[1::2]
        waiting = waiting_task_ids(r, ("io",)) if any(q is not None for q in queued) else set()
        due = [file for file, task, locked in zip(files, queued, busy)
               # Its task still waits in the queue, or its app-hour is being uploaded right now
               # (the next sweep looks again). Otherwise never sent, done, or lost with a killed
               # worker: send it (a repeat is harmless).
               if not (task is not None and task.decode() in waiting) and not locked]
        task_ids = [uuid.uuid4().hex for _ in due]
        with r.pipeline(transaction=False) as pipe:
            for file, task_id in zip(due, task_ids):
                pipe.set(_queued_key(file.entry), task_id, ex=QUEUED_TTL_SECONDS)
            pipe.execute()
        for file, task_id in zip(due, task_ids):
            app.send_task("sluice.upload_file", args=[file.entry, file.size], queue="io", task_id=task_id)
        sent = len(due)
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
