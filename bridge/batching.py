"""Bridge batching: what each partition has fetched and not yet handed over, and when it is due.

A batch is whole Kafka record batches (a Kafka batch is never cut: the payload is exactly what
the broker sent), within SLUICE_BATCH_MAX_BYTES / _RECORDS, or whatever has waited
SLUICE_BATCH_MAX_SECONDS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from sluice.core.settings import Settings
from sluice.handover.kafka_batches import Chunk


@dataclass
class Buffer:
    """What one partition has fetched and not yet handed over."""

    chunks: list[Chunk] = field(default_factory=list)  # whole Kafka record batches, in order
    nbytes: int = 0
    since: float = 0.0  # monotonic time of its first chunk
    verify: bool = False  # first records after a quiet spell: check the incarnation first

    def add(self, chunks: list[Chunk], now: float) -> None:
        if not self.chunks:
            self.since = now
        self.chunks.extend(chunks)
        self.nbytes += sum(len(c.data) for c in chunks)

    def due(self, settings: Settings, now: float) -> bool:
        """Full by size or record count, or old enough."""
        return bool(self.chunks) and (
            self.nbytes >= settings.batch_max_bytes
            or self.chunks[-1].last - self.chunks[0].first >= settings.batch_max_records
            or now - self.since >= settings.batch_max_seconds)


def cut(chunks: list[Chunk], settings: Settings) -> Iterator[list[Chunk]]:
    """The chunks in runs within the size and record limits (a run holds at least one chunk)."""
    start = 0
    while start < len(chunks):
        end, nbytes = start, 0
        while end < len(chunks) and (end == start or (
                nbytes + len(chunks[end].data) <= settings.batch_max_bytes
                and chunks[end].last - chunks[start].first < settings.batch_max_records)):
            nbytes += len(chunks[end].data)
            end += 1
        yield chunks[start:end]
        start = end
