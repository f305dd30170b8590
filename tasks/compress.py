"""compress [queue cpu]: one zstd frame per app-hour piece, each appended exactly once."""

from __future__ import annotations

import redis
from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from sluice.core.errors import LockLost, SlotsBusy
from sluice.core.settings import get_settings
from sluice.slots.compress import compress_pieces
from tasks.app import app
from tasks.deps import appender, batches, compressor, queued_tasks

_limit = get_settings().compress_time_limit


# OSError: a full or failing spool disk; nothing was committed, so the task waits and tries again.
# SoftTimeLimitExceeded: a task held up (a spool or Redis outage) past its limit; nothing was
# committed that a retry would repeat.
@app.task(name="sluice.compress", bind=True,
          autoretry_for=(SlotsBusy, LockLost, redis.RedisError, OSError, SoftTimeLimitExceeded),
          retry_backoff=True, retry_backoff_max=30, max_retries=None,
          time_limit=_limit, soft_time_limit=_limit * 0.9, repairs_state=False)
def compress(self: Task, bid: str, pieces: list[str]) -> int:
    """Returns how many pieces this call appended; pieces appended by an earlier delivery of
    the same task (or by a redriven copy) are skipped."""
    queued_tasks().started(bid, self.request.id)
    return compress_pieces(batches(), appender(), compressor(), bid, pieces)
