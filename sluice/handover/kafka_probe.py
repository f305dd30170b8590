"""Reading what the broker holds now at an offset of a partition, outside any consumer group.

The bridge asks it whether the record at its mark is still the one it handed over (a recreated
topic, bridge.incarnation), and how old the oldest record it has not handed over is (lag in
seconds); `sluice status` asks it the same of every partition. The end of a partition's log is
read from a fetch reply's high watermark: Tansu answers a fetch beyond the end with no records
rather than OffsetOutOfRange, and its ListOffsets end offset is wrong for batches of several
records.
"""

from __future__ import annotations

import time
import zlib
from typing import Any, NamedTuple

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from sluice.core.errors import SluiceError

PROBE_SECONDS = 10.0


class ProbeInconclusive(SluiceError, KafkaError):
    """The broker did not say, within the timeout, what it holds at the offset. Deciding
    anyway would either drop a new incarnation's records or archive a replay twice."""


class Seen(NamedTuple):
    """The first record at or after the offset asked about, as the broker holds it now."""

    offset: int
    timestamp_ms: int
    fingerprint: str


def fingerprint(record: Any) -> str:
    """Kafka timestamp and a checksum of key and value: what identifies a record at an offset.

    `record`: a Record or a Kafka client's record (offset, timestamp, key, value)."""
    digest = zlib.crc32(record.value or b"", zlib.crc32(record.key or b""))
    return f"{record.timestamp}:{digest:08x}"


class Prober:
    """A consumer of its own, outside the group, so the bridge's positions stay as they are.
    Not thread-safe: one caller at a time."""

    def __init__(self, bootstrap: str, timeout: float = PROBE_SECONDS) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout
        self._consumer: KafkaConsumer | None = None

    def _client(self) -> KafkaConsumer:
        if self._consumer is None:
            self._consumer = KafkaConsumer(bootstrap_servers=self.bootstrap.split(","), group_id=None,
                                           enable_auto_commit=False, auto_offset_reset="none",
                                           client_id="sluice-probe")
        return self._consumer

    def __call__(self, tp: TopicPartition, offset: int) -> tuple[int, str] | None:
        """(offset, fingerprint) of the first record at or after `offset`; None when the log
        ends before it. ProbeInconclusive when the broker does not answer in time."""
        seen, _ = self.probe(tp, offset)
        return (seen.offset, seen.fingerprint) if seen is not None else None

    def probe(self, tp: TopicPartition, offset: int) -> tuple[Seen | None, int | None]:
        """The first record at or after `offset` (None when the log ends before it) and the end
        of the log (the offset after its last record), if the broker said.

        Each probe uses a consumer of its own, closed after it: a consumer kept from an earlier
        probe may hold records it fetched then, and answer from them instead of the broker."""
        try:
            return self._probe(tp, offset)
        finally:
            self.close()

    def _probe(self, tp: TopicPartition, offset: int) -> tuple[Seen | None, int | None]:
        try:
            consumer = self._client()
        except KafkaError as exc:  # no broker answered the connection's own requests
            raise ProbeInconclusive(f"no answer from the broker about {tp.topic}:{tp.partition} "
                                    f"at offset {offset}: {type(exc).__name__}") from exc
        consumer.assign([tp])
        consumer.seek(tp, offset)
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            try:
                polled = consumer.poll(timeout_ms=500, max_records=1)
            except (OffsetOutOfRangeError, NoOffsetForPartitionError):
                return None, None  # beyond the end of the log
            except KafkaError:
                continue  # a passing broker error: ask again until the deadline
            for message in polled.get(tp, []):
                if message.offset >= offset:
                    return Seen(message.offset, message.timestamp, fingerprint(message)), consumer.highwater(tp)
            highwater = consumer.highwater(tp)  # set only by a reply to a fetch at `offset`
            if highwater is not None and highwater <= offset:
                return None, highwater
        raise ProbeInconclusive(f"no answer from the broker about {tp.topic}:{tp.partition} "
                                f"at offset {offset} within {self.timeout:.0f}s")

    def partitions(self, topic: str) -> list[int]:
        """The partitions of a topic, as the broker's metadata has them (empty if unknown)."""
        return sorted(self._client().partitions_for_topic(topic) or [])

    def topics(self) -> set[str]:
        return set(self._client().topics())

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
