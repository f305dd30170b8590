"""Per-process singletons the tasks share, created lazily so they are built after a fork."""

from __future__ import annotations

import threading
from functools import lru_cache

import zstandard

from sluice.ledger import Ledger
from sluice.records import Router
from sluice.redis_client import get_redis
from sluice.settings import get_settings
from sluice.slots import Slots
from sluice.store import Store, open_store


@lru_cache(maxsize=1)
def ledger() -> Ledger:
    return Ledger(get_redis(), get_settings())


@lru_cache(maxsize=1)
def slots() -> Slots:
    return Slots(get_redis(), get_settings())


@lru_cache(maxsize=1)
def router() -> Router:
    s = get_settings()
    return Router(s.app_id_source, s.timestamp_field, s.record_max_bytes)


@lru_cache(maxsize=1)
def store() -> Store:
    return open_store(get_settings())


_local = threading.local()


def compressor() -> zstandard.ZstdCompressor:
    """A ZstdCompressor is not thread-safe, so each thread gets its own."""
    if not hasattr(_local, "cctx"):
        _local.cctx = zstandard.ZstdCompressor(level=get_settings().zstd_level,
                                               write_checksum=True, write_content_size=True)
    return _local.cctx
