"""Records no Kafka reader can decode are delivered, flagged, instead of stopping their partition.

Both record readers sluice could use decode every header name as UTF-8: aiokafka's compiled one
raises UnicodeDecodeError, kafka-python 2.3 raises CorruptRecordError. One record whose header
name is not UTF-8 (kcat and librdkafka send such names without complaint) would stop its whole
batch. The split reads such a batch again with kafka-python's reader after `install()`, which
wraps kafka-python's batch class: when one record cannot be read, it is read again without
decoding anything, and handed on with its header names as `RawName` (a str that keeps the raw
bytes). A record whose very framing is broken is handed on whole as raw bytes under the header
name `UNREADABLE`. `record_of` turns either into a `Record` with a `flaw`, which the split sends
to quarantine with every byte.

This patches a private method of the pinned kafka-python (pyproject.toml); the unit tests
build such batches with kafka-python's own builder and fail if the patch stops applying.
"""

from __future__ import annotations

from typing import Any

from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecord, DefaultRecordBatch
from kafka.record.util import decode_varint

from sluice.formats.records import Record


class RawName(str):
    """A header name that is not UTF-8: readable text for kafka-python, the bytes in `raw`."""

    raw: bytes

    def __new__(cls, raw: bytes) -> "RawName":
        name = super().__new__(cls, raw.decode("utf-8", "backslashreplace"))
        name.raw = raw
        return name


# The one header of a record that could not even be framed; its value is the raw bytes.
UNREADABLE = RawName(b"<unreadable record>")

_read_msg = DefaultRecordBatch._read_msg


def _read_bytes(buffer: bytearray, pos: int) -> tuple[bytes | None, int]:
    length, pos = decode_varint(buffer, pos)
    if length < 0:
        return None, pos
    if pos + length > len(buffer):
        raise ValueError("field runs past the record")
    return bytes(buffer[pos:pos + length]), pos + length


def _read_raw(batch: DefaultRecordBatch) -> DefaultRecord:
    """The record at the batch's read position with nothing decoded; moves the position past it
    (the record count is the caller's, `DefaultRecordBatch.__next__`).

    Mirrors the v2 record layout kafka-python reads (length, attributes, timestamp delta,
    offset delta, key, value, headers), but keeps header names as bytes.
    """
    buffer, start = batch._buffer, batch._pos
    length, pos = decode_varint(buffer, start)
    end = pos + length
    offset = batch.base_offset + batch._next_record_index  # offsets in a batch are consecutive
    timestamp = batch.first_timestamp
    try:
        if length <= 0 or end > len(buffer):
            raise ValueError("record length runs past its batch")
        _, pos = decode_varint(buffer, pos)  # attributes
        ts_delta, pos = decode_varint(buffer, pos)
        offset_delta, pos = decode_varint(buffer, pos)
        key, pos = _read_bytes(buffer, pos)
        value, pos = _read_bytes(buffer, pos)
        count, pos = decode_varint(buffer, pos)
        headers: list[tuple[str, Any]] = []
        for _ in range(count):
            name, pos = _read_bytes(buffer, pos)
            header_value, pos = _read_bytes(buffer, pos)
            try:
                headers.append(((name or b"").decode("utf-8"), header_value))
            except UnicodeDecodeError:
                headers.append((RawName(name or b""), header_value))
        if pos != end:
            raise ValueError("record fields do not add up to its length")
    except (ValueError, IndexError):
        # Not even the fields can be read: hand on the raw bytes of the rest of the batch.
        end = end if 0 < length and end <= len(buffer) else len(buffer)
        record = DefaultRecord(end - start, offset, timestamp, batch.timestamp_type, None,
                               bytes(buffer[start:end]), [(UNREADABLE, None)])
        batch._pos = end
        if end == len(buffer):  # nothing after it can be framed either; the caller adds one
            batch._next_record_index = batch._num_records - 1
        return record
    if batch.timestamp_type != batch.LOG_APPEND_TIME:
        timestamp = batch.first_timestamp + ts_delta
    else:
        timestamp = batch.max_timestamp
    batch._pos = end
    return DefaultRecord(end - start, batch.base_offset + offset_delta, timestamp,
                         batch.timestamp_type, key, value, headers)


def _read_msg_or_raw(self: DefaultRecordBatch, *args: Any, **kwargs: Any) -> DefaultRecord:
    start = self._pos
    try:
        return _read_msg(self, *args, **kwargs)
    except (CorruptRecordError, ValueError, IndexError):
        if self.is_control_batch:
            raise
        self._pos = start
        return _read_raw(self)


def install() -> None:
    """Make kafka-python deliver undecodable records instead of raising; idempotent."""
    DefaultRecordBatch._read_msg = _read_msg_or_raw


def record_of(message: ConsumerRecord) -> Record:
    """The Record of a message kafka-python read, with its flaw if it could not be decoded."""
    headers = message.headers
    if not headers:
        return Record(message.offset, message.timestamp, message.key, message.value, [])
    if headers[0][0] is UNREADABLE:
        return Record(message.offset, message.timestamp, None, message.value, [], "unreadable_record")
    if not any(isinstance(name, RawName) for name, _ in headers):
        return Record(message.offset, message.timestamp, message.key, message.value, list(headers))
    return Record(message.offset, message.timestamp, message.key, message.value,
                  [(name.raw if isinstance(name, RawName) else name, v) for name, v in headers],
                  "undecodable_header")
