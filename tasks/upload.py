"""upload [queue io], run by Beat: seal due slot files, then one `upload_app_hour` task per app-hour
with sealed files, and one `archive_tail` task per hour with sealed tail files (sluice.archive.tail).

Uploads are network-bound: against a distant store, thousands of app-hour files an hour one after
the other in one task would take minutes. Sent as tasks of their own they run on all io threads.
"""

from __future__ import annotations

import uuid

import redis
from celery.utils.log import get_task_logger

from sluice.archive.uploader import by_app_hour
from sluice.core import schema
from sluice.core.redis_client import get_redis, server_time
from sluice.core.settings import get_settings
from sluice.formats.records import hour_of
from sluice.formats.spool import SealedFile
from sluice.ops.queues import waiting_task_ids
from sluice.ops.repair import require_verified
from sluice.slots.sealed import SealedRegistry
from tasks.app import app, send
from tasks.deps import batches, sealer, tail_archiver, uploader

log = get_task_logger(__name__)


@app.task(name="sluice.upload", autoretry_for=(redis.RedisError,), max_retries=3)
def upload() -> int:
    """Seal what is due and send an upload task for every app-hour with sealed files that has
    none queued; returns how many were sent. One sweep at a time: a second Beat tick just returns."""
    settings = get_settings()
    r = get_redis()
    require_verified(r)  # seals, uploads and tidies only on a state checked against the spool
    lock = r.lock(schema.SWEEP_LOCK, timeout=max(30.0, settings.upload_interval_seconds * 4), blocking=False)
    if not lock.acquire():
        return 0
    try:
        batches().drop_orphans(older_than=settings.redrive_after_seconds)
        sealed = sealer().seal_due()
        groups = by_app_hour(SealedRegistry(r).sealed_files())
        # A past hour's tail files are archived once all of them are sealed (they will be within
        # the seal age): one archive writes each app's object, where several would merge into it.
        open_tails = {schema.parse_slot_id(sid.decode())[1] for sid in r.smembers(schema.SLOTS)
                      if sid.startswith(schema.TAIL_APP.encode() + b"|")}
        current = hour_of(server_time(r))
        groups = {(app_name, hour): files for (app_name, hour), files in groups.items()
                  if not (app_name == schema.TAIL_APP and hour in open_tails and hour != current)}
        with r.pipeline(transaction=False) as pipe:  # one round trip, however many files wait
            for app_name, hour in groups:
                pipe.get(schema.upload_queued(app_name, hour))
                pipe.exists(schema.upload_lock(app_name, hour))
            replies = pipe.execute() if groups else []
        queued, busy = replies[0::2], replies[1::2]
        waiting = waiting_task_ids(r, ("io",)) if any(q is not None for q in queued) else set()
        due = [files for files, task, locked in zip(groups.values(), queued, busy)
               # Its task still waits in the queue, or the app-hour is being uploaded right now
               # (the next sweep looks again). Otherwise never sent, done, or lost with a killed
               # worker: send it (a repeat is harmless).
               if not (task is not None and task.decode() in waiting) and not locked]
        task_ids = [uuid.uuid4().hex for _ in due]
        with r.pipeline(transaction=False) as pipe:
            for files, task_id in zip(due, task_ids):
                pipe.set(schema.upload_queued(files[0].app, files[0].hour), task_id, ex=schema.QUEUED_TTL_SECONDS)
            pipe.execute()
        for files, task_id in zip(due, task_ids):
            listed = [[f.fid, f.size] for f in files]
            if files[0].app == schema.TAIL_APP:
                send("sluice.archive_tail", [files[0].hour, listed], task_id, queue="io")
            else:
                send("sluice.upload_app_hour", [files[0].app, files[0].hour, listed], task_id, queue="io")
        if sealed or due:
            log.info("sealed %d slot files, sent uploads of %d app-hours", sealed, len(due))
        return len(due)
    finally:
        try:
            lock.release()
        except redis.exceptions.LockError:
            log.warning("sweep outlived its lock; uploads are idempotent, so no harm done")


@app.task(name="sluice.upload_app_hour", autoretry_for=(redis.RedisError,), max_retries=3)
def upload_app_hour(app_name: str, hour: str, files: list[list]) -> int:
    """Archive the sealed files (fid, size) of one app-hour (idempotent); a failure is logged,
    the task shows as failed in Flower, and the next sweep sends what is left again."""
    try:
        require_verified(get_redis())
        return uploader().archive_app_hour([SealedFile(app_name, hour, fid, size) for fid, size in files])
    finally:
        get_redis().delete(schema.upload_queued(app_name, hour))


@app.task(name="sluice.archive_tail", autoretry_for=(redis.RedisError,), max_retries=3)
def archive_tail(hour: str, files: list[list]) -> int:
    """Archive the sealed tail files (fid, size) of an hour as one object per app (idempotent);
    on a failure the task shows as failed in Flower, and the next sweep sends it again."""
    try:
        require_verified(get_redis())
        return tail_archiver().archive_hour(hour, [SealedFile(schema.TAIL_APP, hour, fid, size) for fid, size in files])
    except redis.ResponseError:
        raise  # the state is being repaired (tasks.app): not a failure of this archive
    except Exception as exc:
        # Said as the uploader says it of an app-hour's file, for an operator reading the log.
        log.error("archiving the tail files of %s failed, will retry: %s", hour, exc)
        SealedRegistry(get_redis()).upload_failed()
        raise
    finally:
        get_redis().delete(schema.upload_queued(schema.TAIL_APP, hour))
