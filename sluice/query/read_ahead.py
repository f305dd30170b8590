"""Read several frame sources at once, decompress their frames on every core, and hand the lines
on in source order.

Store reads are network-bound, so `sluice fetch` reads the objects of an hour together in
threads, each a bounded number of frames ahead of the printer. Frames are independent and zstd
releases the GIL while it decompresses, so the frames are decompressed by a pool of threads, as
many as there are cores, several frames ahead of the one being printed; the output keeps the
order of the sources and of their frames. Memory is bounded by the frames in flight, not by the
size of an object. What the caller does to each block that needs no order (finding the lines a
--grep wants) is done in the decoding threads too, side by side with the other's decompression.
"""

from __future__ import annotations

import collections
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, NamedTuple

import zstandard

from sluice.core.errors import Damaged
from sluice.formats.frames import Block, Unit, decode

# Sources read at once.
READ_THREADS = 8
# Frames (compressed) a reader may hold ahead of the caller, per source.
READ_AHEAD = 4
# Threads that decompress, and the frames they may work on ahead of the one being printed.
DECODERS = max(2, os.cpu_count() or 2)
DECODE_AHEAD = 2 * DECODERS


class Undecoded(NamedTuple):
    """A frame to decompress (only `app`'s part of a tail frame)."""

    unit: Unit
    app: str | None


# What a source yields: frames to decompress, or lines read already (a stream written before
# announcements is decompressed as it is read).
Frames = Iterator[Undecoded | Block]

_local = threading.local()


def _decode(job: Undecoded, prepare: Callable[[Block], Any]) -> list[tuple[Block, Any]]:
    if not hasattr(_local, "dctx"):
        _local.dctx = zstandard.ZstdDecompressor()  # not thread-safe: one per thread
    return [(block, prepare(block)) for block in decode(job.unit, _local.dctx, job.app)]


def read_ahead(sources: list[tuple[str, Callable[[], Frames]]], prepare: Callable[[Block], Any] = lambda block: None,
               ) -> Iterator[tuple[str, Block | Exception, Any]]:
    """(source name, block, `prepare` of the block) of every source in order. READ_THREADS
    threads read the sources at once, each at most READ_AHEAD frames ahead; DECODERS threads
    decompress (and prepare) up to DECODE_AHEAD frames ahead of the caller. A frame that cannot
    be decompressed, or a source that fails, comes as an exception in its place; the source's
    other frames still come."""
    if not sources:
        return
    stop = threading.Event()
    queues: list[queue.Queue] = [queue.Queue(maxsize=READ_AHEAD) for _ in sources]
    end = object()

    def put(q: queue.Queue, item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pump(frames: Callable[[], Frames], q: queue.Queue) -> None:
        try:
            for item in frames():
                if not put(q, item):
                    return
        except (Damaged, OSError) as exc:
            put(q, exc)
        put(q, end)

    readers = ThreadPoolExecutor(max_workers=min(READ_THREADS, len(sources)), thread_name_prefix="fetch-read")
    decoders = ThreadPoolExecutor(max_workers=DECODERS, thread_name_prefix="fetch-decode")
    pending: collections.deque[tuple[str, Future[list[tuple[Block, Any]]] | Block | Exception]] = collections.deque()

    def ready(name: str, item: Future[list[tuple[Block, Any]]] | Block | Exception,
              ) -> Iterator[tuple[str, Block | Exception, Any]]:
        if isinstance(item, Future):
            try:
                for block, prepared in item.result():
                    yield name, block, prepared
            except Damaged as exc:
                yield name, exc, None
        elif isinstance(item, Block):
            yield name, item, prepare(item)
        else:
            yield name, item, None

    try:
        for (_, frames), q in zip(sources, queues):
            readers.submit(pump, frames, q)
        for (name, _), q in zip(sources, queues):
            while (item := q.get()) is not end:
                pending.append((name, decoders.submit(_decode, item, prepare) if isinstance(item, Undecoded) else item))
                while len(pending) > DECODE_AHEAD or (pending and not isinstance(pending[0][1], Future)):
                    yield from ready(*pending.popleft())
        while pending:
            yield from ready(*pending.popleft())
    finally:
        stop.set()
        readers.shutdown(wait=True, cancel_futures=True)
        decoders.shutdown(wait=True, cancel_futures=True)
