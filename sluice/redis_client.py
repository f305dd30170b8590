"""One Redis client per process (redis-py resets its pool after a fork, so prefork is safe)."""

from __future__ import annotations

from functools import lru_cache

import redis

from sluice.settings import get_settings


@lru_cache(maxsize=1)
def get_redis() -> redis.Redis:
    url = get_settings().redis_url.get_secret_value()
    return redis.Redis.from_url(url, health_check_interval=30, socket_keepalive=True)
