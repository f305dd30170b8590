"""How far the pipeline has got, read from Redis: for the demo, the benchmark and the tests.

Every figure counts records since Redis was first used (offsets start at 0 per partition).
"""

from __future__ import annotations

import redis

from sluice.ledger import EARLIER_KEY, HWM_KEY, INFLIGHT_KEY, STATS_KEY
from sluice.slots import SEALED_KEY, SLOTS_KEY


def handed_over(r: redis.Redis) -> int:
    """Records the bridge has handed over, earlier incarnations of recreated topics included."""
    return sum(int(v) + 1 for v in r.hvals(HWM_KEY)) + sum(int(v) for v in r.hvals(EARLIER_KEY))


def per_app(r: redis.Redis) -> dict[str, int]:
    """Records appended to slot files, per app (quarantine included)."""
    return {k.decode(): int(v) for k, v in r.hgetall(STATS_KEY).items()}


def compressed(r: redis.Redis) -> int:
    return sum(per_app(r).values())


def settled(r: redis.Redis, expected: int) -> bool:
    """`expected` records compressed, and nothing left in flight, in open slots or sealed."""
    return (compressed(r) >= expected and r.zcard(INFLIGHT_KEY) == 0
            and r.scard(SLOTS_KEY) == 0 and r.hlen(SEALED_KEY) == 0)
