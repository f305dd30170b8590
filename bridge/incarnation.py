"""Telling a replay from a new incarnation of a topic.

The ledger drops records at or below a partition's high-water mark as replays. That is right
after a crash or an offset reset, and wrong after the topic was deleted and recreated (or the
cluster rebuilt): the new incarnation's offsets start again at 0 and its records are new.
kafka-python 2.3 cannot see topic ids (Metadata v10+), so the mark carries a fingerprint of the
record at its offset instead. Before records at or below the mark are dropped, the record now
at that offset is compared with it: the same record means a replay; a different record, or none
at all (the log no longer reaches the mark), means a new incarnation.
"""

from __future__ import annotations

import time
import zlib
from typing import Any

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from sluice.records import Record

PROBE_SECONDS = 10.0


class ProbeInconclusive(KafkaError):
    """The broker did not say, within the timeout, what it holds at the offset. Deciding
    anyway would either drop a new incarnation's records or archive a replay twice."""


def fingerprint(record: Any) -> str:
    """Kafka timestamp and a checksum of key and value: what identifies a record at an offset.

    `record`: a Record or a Kafka client's record (offset, timestamp, key, value)."""
    digest = zlib.crc32(record.value or b"", zlib.crc32(record.key or b""))
    return f"{record.timestamp}:{digest:08x}"


def same_incarnation(mark: int, mark_fingerprint: str, seen: tuple[int, str] | None) -> bool:
    """Whether the log still holds the record of the mark.

    `seen` is the first record the broker now has at or after the mark (its offset and
    fingerprint), None if it has none.
    """
    if seen is None:
        return False  # the log is shorter than what was handed over
    offset, found = seen
    if offset != mark:
        return True  # the mark's record was compacted or aged away; the log goes on past it
    return found == mark_fingerprint


class Prober:
    """Reads the first record at or after an offset of a partition as the broker has it now.

    A consumer of its own, outside the group, so the bridge's positions stay as they are;
    created on first use and kept for the next probe.
    """

    def __init__(self, bootstrap: str, timeout: float = PROBE_SECONDS) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout
        self._consumer: KafkaConsumer | None = None

    def __call__(self, tp: TopicPartition, offset: int) -> tuple[int, str] | None:
        """(offset, fingerprint) of that record; None when the log ends before it.

        Raises ProbeInconclusive when the broker does not answer within the timeout. The end of
        the log is read from the fetch reply's high watermark: Tansu answers a fetch beyond the
        end with no records rather than OffsetOutOfRange, and its ListOffsets end offset is
        wrong for batches of several records."""
        if self._consumer is None:
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap.split(","), group_id=None,
                                           enable_auto_commit=False, auto_offset_reset="none",
                                           client_id="sluice-bridge-probe")
        consumer = self._consumer
        consumer.unsubscribe()  # a fresh partition state: no high watermark from an earlier probe
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                polled = consumer.poll(timeout_ms=500, max_records=1)
            except (OffsetOutOfRangeError, NoOffsetForPartitionError):
                return None  # beyond the end of the log
            except KafkaError:
                continue  # a passing broker error: ask again until the deadline
            for message in polled.get(tp, []):
                if message.offset >= offset:
                    return message.offset, fingerprint(
                        Record(message.offset, message.timestamp, message.key, message.value, []))
            highwater = consumer.highwater(tp)  # set only by a reply to a fetch at `offset`
            if highwater is not None and highwater <= offset:
                return None
        raise ProbeInconclusive(f"no answer from the broker about {tp.topic}:{tp.partition} "
                                f"at offset {offset} within {self.timeout:.0f}s")

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
