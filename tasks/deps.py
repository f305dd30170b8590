"""Per-process singletons the tasks share, created lazily so they are built after a fork."""

from __future__ import annotations

import threading
from functools import lru_cache

import zstandard

from sluice.archive.store import open_store
from sluice.archive.tail import TailArchiver
from sluice.archive.uploader import Uploader
from sluice.core.redis_client import get_redis
from sluice.core.settings import get_settings
from sluice.formats.records import Router
from sluice.handover.batches import Batches
from sluice.handover.queued import QueuedTasks
from sluice.slots.appends import Appender
from sluice.slots.sealing import Sealer


@lru_cache(maxsize=1)
def batches() -> Batches:
    return Batches(get_redis(), get_settings())


@lru_cache(maxsize=1)
def queued_tasks() -> QueuedTasks:
    return QueuedTasks(get_redis())


@lru_cache(maxsize=1)
def appender() -> Appender:
    return Appender(get_redis(), get_settings())


@lru_cache(maxsize=1)
def sealer() -> Sealer:
    return Sealer(get_redis(), get_settings())


@lru_cache(maxsize=1)
def uploader() -> Uploader:
    return Uploader(get_redis(), get_settings(), open_store(get_settings()))


@lru_cache(maxsize=1)
def tail_archiver() -> TailArchiver:
    return TailArchiver(get_redis(), get_settings(), open_store(get_settings()))


@lru_cache(maxsize=1)
def router() -> Router:
    s = get_settings()
    return Router(s.app_id_source, s.timestamp_field, s.record_max_bytes)


_local = threading.local()


def compressor() -> zstandard.ZstdCompressor:
    """A ZstdCompressor is not thread-safe, so each thread gets its own."""
    if not hasattr(_local, "cctx"):
        _local.cctx = zstandard.ZstdCompressor(level=get_settings().zstd_level,
                                               write_checksum=True, write_content_size=True)
    return _local.cctx
