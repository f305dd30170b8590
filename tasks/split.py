"""split [queue io]: turn one handed-over batch into app-hour pieces, one compress task per
bundle of them; and the redrive of batches whose tasks were lost."""

from __future__ import annotations

import redis
from celery import Task
from celery.utils.log import get_task_logger

from sluice.core import schema
from sluice.core.settings import get_settings
from sluice.handover.split import bundle_pieces, split_batch
from sluice.ops.queues import waiting_task_ids
from sluice.ops.repair import require_verified
from tasks.app import app, enqueue
from tasks.deps import batches, queued_tasks, router

log = get_task_logger(__name__)


# OSError: a full or failing spool disk (the pieces are written there); nothing was committed.
@app.task(name="sluice.split", bind=True, autoretry_for=(redis.RedisError, OSError), retry_backoff=True,
          retry_backoff_max=30, max_retries=None)
def split(self: Task, bid: str) -> int:
    """Idempotent: a repeat finds the batch already split and only re-enqueues what is pending.

    Returns the number of compress tasks enqueued."""
    queued_tasks().started(bid, self.request.id)
    split_batch(batches(), router(), bid, get_settings().tail_piece_bytes)
    bundles = bundle_pieces(batches().pending_sizes(bid), get_settings().compress_bundle_bytes)
    for bundle in bundles:
        enqueue("sluice.compress", bid, bundle)
    return len(bundles)


@app.task(name="sluice.redrive", autoretry_for=(redis.RedisError,), max_retries=3)
def redrive() -> int:
    """Finish batches whose tasks were lost (a worker killed mid-task, a broker restart without
    persistence); a batch with a task still waiting in the broker is left to it."""
    redriven = 0
    require_verified(batches().r)
    stale = batches().stale(get_settings().redrive_after_seconds)
    waiting = waiting_task_ids(batches().r) if stale else set()
    for bid in stale:
        batches().touch(bid)
        if queued_tasks().queued(bid, waiting):
            continue
        log.warning("redriving batch %s, in flight for too long", bid)
        enqueue("sluice.split", bid)
        batches().r.hincrby(schema.COUNTERS, schema.Counter.REDRIVES.value, 1)
        redriven += 1
    return redriven
