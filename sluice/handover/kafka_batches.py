"""Kafka record batches, handed over as the broker sent them and decoded where they are split.

kafka-python decodes every record in pure Python inside `poll()`, which costs more than the rest
of the bridge's work (BENCHMARKS.md). Instead the bridge keeps kafka-python as its client
(group membership, fetching, positions, offset commits) but takes the fetched record batches
as they are (`use_raw_batches`), and the claim-check payload of a batch is those bytes: Kafka's
own format, CRCs and producer compression included. The split decodes them with aiokafka's
compiled record reader, an order of magnitude cheaper, falling back to kafka-python's reader for a
batch the compiled one refuses (a header name that is not UTF-8, a broken record), so such
records still reach the quarantine with their flaw (see `sluice.handover.undecodable`).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from typing import Any, Iterator

from aiokafka.errors import CorruptRecordException
from aiokafka.record._crecords import DefaultRecordBatch as FastBatch
from aiokafka.record._crecords import LegacyRecordBatch as FastLegacyBatch
from kafka.consumer.fetcher import Fetcher
from kafka.errors import CorruptRecordError
from kafka.record import MemoryRecords

from sluice.formats.records import Record
from sluice.handover import undecodable

# What the compiled reader raises on a batch it cannot read (its own corruption error is not
# kafka-python's).
_UNREADABLE = (UnicodeDecodeError, ValueError, CorruptRecordError, CorruptRecordException)
LOG_OVERHEAD = 12  # base offset (int64) and batch length (int32) precede every batch
MAGIC_AT = 16
# Where a batch's first timestamp (int64) lies: v2 after base offset, length, leader epoch, magic,
# CRC, attributes and last offset delta; v1 after offset, size, CRC, magic and attributes.
_FIRST_TIMESTAMP_AT = {2: 27, 1: 18}


@dataclass(frozen=True)
class Chunk:
    """One fetched record batch of a partition, byte for byte.

    Its records below `first` were fetched with it but are not ours (the fetch began inside
    the batch); `last` is the batch's last offset, whether or not compaction kept that record.
    """

    first: int
    last: int
    data: memoryview | bytes

    @property
    def offset(self) -> int:
        """What kafka-python compares with the fetch position to skip what was consumed."""
        return self.last

    @property
    def first_timestamp_ms(self) -> int | None:
        """The Kafka timestamp of the batch's first record, from its header; None for a v0
        message set (no timestamps) or a batch too short to hold one."""
        at = _FIRST_TIMESTAMP_AT.get(self.data[MAGIC_AT]) if len(self.data) > MAGIC_AT else None
        if at is None or len(self.data) < at + 8:
            return None
        (ts,) = struct.unpack_from(">q", self.data, at)
        return int(ts) if ts >= 0 else None


def _spans(buffer: Any) -> Iterator[tuple[int, int, int]]:
    """(start, end, magic) of each complete batch; a batch cut off at the end of a fetch is
    left for the next fetch, as kafka-python does."""
    pos, size = 0, len(buffer)
    while pos + LOG_OVERHEAD <= size:
        (length,) = struct.unpack_from(">i", buffer, pos + 8)
        end = pos + LOG_OVERHEAD + length
        if length <= 0 or end > size:
            return
        yield pos, end, buffer[pos + MAGIC_AT]
        pos = end


def _fast_batch(data: Any, magic: int) -> Any:
    return FastBatch(data) if magic >= 2 else FastLegacyBatch(data, magic)


class _RawPartitionRecords(Fetcher.PartitionRecords):
    """kafka-python's fetched-partition reader, yielding one Chunk per record batch instead of
    one ConsumerRecord per record; positions advance batch by batch as before."""

    next_fetch_offset: int  # kafka-python's own attribute, set by its constructor

    def _maybe_skip_record(self, chunk: Chunk) -> bool:
        return chunk.last < self.fetch_offset

    def _unpack_records(self, tp: Any, records: Any, key_deserializer: Any,
                        value_deserializer: Any) -> Iterator[Chunk]:
        buffer = memoryview(records._buffer)
        for start, end, magic in _spans(buffer):
            data = buffer[start:end]  # a view: kafka-python never changes the bytes it fetched
            batch = _fast_batch(data, magic)
            if self.check_crcs and not batch.validate_crc():
                raise CorruptRecordError(f"Record batch for partition {tp} at offset "
                                         f"{self.next_fetch_offset} failed crc check")
            if magic >= 2:
                first, following = batch.base_offset, batch.next_offset
            else:  # a legacy message set: its offsets are only known by reading it
                offsets = [r.offset for r in batch]
                first, following = offsets[0], offsets[-1] + 1
            self.next_fetch_offset = following
            if batch.is_control_batch:  # transaction markers are not records
                continue
            self.records_read += following - first
            self.bytes_read += end - start
            yield Chunk(max(first, self.fetch_offset), following - 1, data)
        self.drain()


def use_raw_batches(consumer: Any) -> None:
    """Make this KafkaConsumer's poll() return Chunks (per partition) instead of records.

    Set on the consumer's own fetcher, so other consumers in the process (the incarnation
    probe) still get records. This replaces a nested class of the pinned kafka-python
    (pyproject.toml); tests/integration/test_kafka_client.py runs a real consumer through it.
    """
    consumer._fetcher.PartitionRecords = _RawPartitionRecords


def records(payload: bytes | memoryview | mmap.mmap, first: int, last: int) -> Iterator[Any]:
    """The records with offsets first..last in a payload of whole batches, in offset order.

    Each has `offset`, `timestamp`, `key`, `value` and `headers`: aiokafka's own record objects
    (no Record is built of each), or a `Record` with its `flaw` when the rest of a batch had to
    be read by kafka-python's reader.

    Records are decoded one at a time as they are asked for, so a whole batch of them is never
    alive at once for Python's cyclic garbage collector to walk again and again. So that one
    reader reads all of a batch, it is first read through once without keeping anything.
    """
    view = memoryview(payload)
    for start, end, magic in _spans(view):
        batch = _fast_batch(view[start:end], magic)
        if batch.is_control_batch:
            continue
        try:
            for _ in batch:
                pass
        except _UNREADABLE:
            yield from _records_slowly(payload[start:end], first, last)
            continue
        batch = _fast_batch(view[start:end], magic)
        if magic >= 2 and first <= batch.base_offset and batch.next_offset - 1 <= last:
            yield from batch  # wholly ours: the usual case
        else:
            for record in batch:
                if first <= record.offset <= last:
                    yield record


def _records_slowly(data: bytes | memoryview, first: int, last: int) -> list[Record]:
    """kafka-python's reader with sluice's patch: records it cannot decode come back flawed."""
    undecodable.install()
    batch = MemoryRecords(data).next_batch()
    return [undecodable.record_of(r) for r in batch if first <= r.offset <= last]


def last_record(chunk: Chunk) -> Any:
    """The chunk's record with the highest offset, None if compaction left it none of ours."""
    found = list(records(chunk.data, chunk.first, chunk.last))
    return found[-1] if found else None


def record_at(chunks: list[Chunk], offset: int) -> Any:
    """The record at `offset` among these chunks, if they hold it."""
    for chunk in chunks:
        if chunk.first <= offset <= chunk.last:
            return next((r for r in records(chunk.data, offset, offset)), None)
    return None
