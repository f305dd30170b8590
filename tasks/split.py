"""split [queue io]: turn one handed-over batch into (app, hour) pieces, one compress task each."""

from __future__ import annotations

import redis
from celery.utils.log import get_task_logger

from sluice.ledger import bundle_pieces
from sluice.settings import get_settings
from sluice.stages import split_batch
from tasks.app import app
from tasks.deps import ledger, router

log = get_task_logger(__name__)


@app.task(name="sluice.split", autoretry_for=(redis.RedisError,), retry_backoff=True,
          retry_backoff_max=30, max_retries=None)
def split(bid: str) -> int:
    """Idempotent: a repeat finds the batch already split and only re-enqueues what is pending.

    Returns the number of compress tasks enqueued."""
    led = ledger()
    split_batch(led, router(), bid)
    bundles = bundle_pieces(led.pending_sizes(bid), get_settings().compress_bundle_bytes)
    for bundle in bundles:
        app.send_task("sluice.compress", args=[bid, bundle])
    return len(bundles)


@app.task(name="sluice.redrive", autoretry_for=(redis.RedisError,), max_retries=3)
def redrive() -> int:
    """Finish batches whose tasks were lost (e.g. a broker restart without persistence)."""
    led = ledger()
    stale = led.stale_batches(get_settings().redrive_after_seconds)
    for bid in stale:
        log.warning("redriving batch %s, in flight for too long", bid)
        led.touch(bid)
        split.delay(bid)
    return len(stale)
