"""How far the pipeline has got, read from Redis: for the demo, the benchmark and the tests.

Every figure counts records since Redis was first used (offsets start at 0 per partition).
"""

from __future__ import annotations

import redis

from sluice.core import schema
from sluice.handover.marks import Marks


def handed_over(r: redis.Redis) -> int:
    """Records the bridge has handed over, earlier incarnations of recreated topics included."""
    return Marks(r).handed_over()


def archived_per_app(r: redis.Redis) -> dict[str, int]:
    """Records archived, per app (quarantine included)."""
    return {k.decode(): int(v) for k, v in r.hgetall(schema.ARCHIVED_RECORDS).items()}


def compressed(r: redis.Redis) -> int:
    """Records appended to slot files (quarantine included)."""
    return int(r.hget(schema.COUNTERS, schema.Counter.RECORDS_APPENDED.value) or 0)


def settled(r: redis.Redis, expected: int) -> bool:
    """`expected` records compressed, and nothing left in flight, in open slots or sealed."""
    return (compressed(r) >= expected and r.zcard(schema.INFLIGHT) == 0
            and r.scard(schema.SLOTS) == 0 and r.hlen(schema.SEALED) == 0)
