"""One Redis client per process (redis-py resets its pool after a fork, so prefork is safe), and
how every sluice connection to Redis notices a dead peer.

Without timeouts a process cut off from Redis hangs on its socket while TCP backs off (tens of
seconds), its time limits cannot fire, and it holds its slots' file locks all that time. With
them, a call fails within seconds, the task retries (every Redis write is idempotent or fenced),
and keepalive probes find a half-open connection an idle process holds. Commands are never
retried on a timeout by the client itself: a script that ran but whose reply was lost must not
run twice unnoticed; the task's own retry re-reads the state instead.
"""

from __future__ import annotations

import socket
from functools import lru_cache
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import Sentinel

from sluice.core.redis_url import parse_sentinel_url
from sluice.core.settings import get_settings

# Connect within this, and get a reply within that: the slowest call sluice makes is a commit script
# of one bundle, milliseconds; a reply later than this is a network fault.
CONNECT_TIMEOUT_SECONDS = 3.0
SOCKET_TIMEOUT_SECONDS = 10.0
# How the kernel finds a dead connection (the peer's kernel answers, however busy Redis is): an
# idle one by keepalive probes (first after 5 s idle, then every 2 s, dead after 3 unanswered);
# one with a request sent and not acknowledged (kombu's BRPOP, which no socket timeout bounds
# while its event loop waits) after TCP_USER_TIMEOUT, instead of retransmitting for minutes.
KEEPALIVE_OPTIONS = {socket.TCP_KEEPIDLE: 5, socket.TCP_KEEPINTVL: 2, socket.TCP_KEEPCNT: 3,
                     socket.TCP_USER_TIMEOUT: 10_000}


def connection_options() -> dict[str, Any]:
    """For redis-py and for kombu's Redis transport (Celery's broker_transport_options) alike."""
    return {"socket_connect_timeout": CONNECT_TIMEOUT_SECONDS, "socket_timeout": SOCKET_TIMEOUT_SECONDS,
            "socket_keepalive": True, "socket_keepalive_options": dict(KEEPALIVE_OPTIONS),
            "health_check_interval": 10}


def no_retries() -> Retry:
    """redis-py (6.0 and later) retries a command three times on a timeout or a broken
    connection, by default. A script whose reply was lost has run: run again, it finds its work
    done and says so (a split already committed, a piece no longer pending), and its caller then
    undoes what the first run recorded (removes the pieces file Redis points at, cuts back the
    frame just committed). So sluice's clients never retry; the task's own retry re-reads the
    state instead."""
    return Retry(NoBackoff(), 0)


def client_for(url: str, **options: Any) -> redis.Redis:
    """A client of the Redis a URL names: redis://, rediss://, unix:// as redis-py reads them, or
    the master a sentinel:// URL's Sentinels name, found again after a failover. It never
    retries a command on its own (`no_retries`)."""
    options = {"retry": no_retries(), **options}
    found = parse_sentinel_url(url)
    if found is None:
        return redis.Redis.from_url(url, **options)
    sentinel = Sentinel(list(found.sentinels), **{k: v for k, v in options.items()
                                                   if k.startswith("socket_") or k == "retry"})
    return sentinel.master_for(found.master, db=found.db, username=found.username, password=found.password,
                               **options)


@lru_cache(maxsize=1)
def get_redis() -> redis.Redis:
    return client_for(get_settings().redis_url.get_secret_value(), **connection_options())


def server_time(r: redis.Redis) -> float:
    """Redis's clock, in epoch seconds: the one clock every host agrees on."""
    seconds, micros = r.time()
    return seconds + micros / 1_000_000
