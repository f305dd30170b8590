"""Read several frame sources at once, in threads, and hand their frames on in source order.

Store reads are network-bound and zstd releases the GIL while it decompresses, so `sluice fetch`
reads the objects of an hour together, each a bounded number of frames ahead of the printer.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator

from sluice.errors import Damaged
from sluice.frames import Block

# Sources read at once.
READ_THREADS = 8
# Decompressed frames a reader may hold ahead of the caller, per source.
READ_AHEAD = 1

# The blocks of each frame of a source.
Frames = Iterator[Block]


def read_ahead(sources: list[tuple[str, Callable[[], Frames]]],
                ) -> Iterator[tuple[str, Block | Exception]]:
    """(source name, block) of every source in order. READ_THREADS threads read and
    decompress the sources at once, each at most READ_AHEAD frames ahead of the caller; a
    source that fails ends with the exception as its data."""
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

    pool = ThreadPoolExecutor(max_workers=min(READ_THREADS, len(sources)), thread_name_prefix="fetch")
    try:
        for (_, frames), q in zip(sources, queues):
            pool.submit(pump, frames, q)
        for (name, _), q in zip(sources, queues):
            while (item := q.get()) is not end:
                yield name, item
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
