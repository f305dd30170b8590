"""split [queue io]: turn one handed-over batch into (app, hour) pieces, one compress task each."""

from __future__ import annotations

import redis
from celery import Task
from celery.utils.log import get_task_logger

from sluice.ledger import bundle_pieces
from sluice.settings import get_settings
from sluice.stages import split_batch
from tasks.app import app, enqueue, waiting_task_ids
from tasks.deps import ledger, router

log = get_task_logger(__name__)


# OSError: a full or failing spool disk (the pieces are written there); nothing was committed.
@app.task(name="sluice.split", bind=True, autoretry_for=(redis.RedisError, OSError), retry_backoff=True,
          retry_backoff_max=30, max_retries=None)
def split(self: Task, bid: str) -> int:
    """Idempotent: a repeat finds the batch already split and only re-enqueues what is pending.

    Returns the number of compress tasks enqueued."""
    led = ledger()
    led.started(bid, self.request.id)
    split_batch(led, router(), bid)
    bundles = bundle_pieces(led.pending_sizes(bid), get_settings().compress_bundle_bytes)
    for bundle in bundles:
        enqueue(led, "sluice.compress", bid, bundle)
    return len(bundles)


@app.task(name="sluice.redrive", autoretry_for=(redis.RedisError,), max_retries=3)
def redrive() -> int:
    """Finish batches whose tasks were lost (a worker killed mid-task, a broker restart without
    persistence); a batch with a task still waiting in the broker is left to it."""
    led = ledger()
    redriven = 0
    stale = led.stale_batches(get_settings().redrive_after_seconds)
    waiting = waiting_task_ids(led.r) if stale else set()
    for bid in stale:
        led.touch(bid)
        if led.queued(bid, waiting):
            continue
        log.warning("redriving batch %s, in flight for too long", bid)
        enqueue(led, "sluice.split", bid)
        redriven += 1
    return redriven
