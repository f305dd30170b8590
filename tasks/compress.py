"""compress [queue cpu]: one zstd frame per piece, appended exactly once to a slot file."""

from __future__ import annotations

import redis

from sluice.ledger import split_piece
from sluice.settings import get_settings
from sluice.slots import LockLost, SlotsBusy
from tasks.app import app
from tasks.deps import compressor, ledger, slots

_limit = get_settings().compress_time_limit


@app.task(name="sluice.compress", autoretry_for=(SlotsBusy, LockLost, redis.RedisError),
          retry_backoff=True, retry_backoff_max=30, max_retries=None,
          time_limit=_limit, soft_time_limit=_limit * 0.9)
def compress(bid: str, piece: str) -> bool:
    """True if this call appended the piece, False if an earlier delivery already had."""
    led = ledger()
    if not led.is_pending(bid, piece):
        return False
    data = led.piece_data(bid, piece)
    if data is None:  # appended by a concurrent duplicate since the check above
        return False
    frame = compressor().compress(data)
    app_id, hour = split_piece(piece)
    return slots().append(bid, app_id, hour, frame, data.count(b"\n"))
