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

import logging
import time
import zlib
from typing import Any, Callable

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError, NoOffsetForPartitionError, OffsetOutOfRangeError

from sluice.errors import SluiceError
from sluice.kafka_batches import Chunk, record_at
from sluice.marks import Mark, Marks
from sluice.records import Record

log = logging.getLogger("sluice.bridge")

# (partition, offset) -> (offset, fingerprint) of the first record at or after it, or None.
Probe = Callable[[TopicPartition, int], "tuple[int, str] | None"]

PROBE_SECONDS = 10.0


class ProbeInconclusive(SluiceError, KafkaError):
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


class IncarnationGuard:
    """The bridge's view of which incarnation each partition's mark belongs to.

    Records at or below a mark are checked before they are dropped as a replay; so are the
    first records after a rebalance or a quiet spell, and a partition quiet for a while is
    probed (its topic may have been recreated under us, its new log not yet past our position).
    """

    def __init__(self, marks: Marks, probe: Probe, check_seconds: float) -> None:
        self.marks = marks
        self.probe = probe
        self.period = check_seconds
        self._verified: dict[TopicPartition, int] = {}  # marks found to be of this incarnation
        self._last_records: dict[TopicPartition, float] = {}  # when records last came
        self._last_probe: dict[TopicPartition, float] = {}

    def records_came(self, tp: TopicPartition, now: float) -> bool:
        """Note that records came; True if they are the first after a rebalance or a quiet
        spell, so their incarnation must be checked before they are handed over."""
        last = self._last_records.get(tp)
        self._last_records[tp] = now
        return last is None or now - last >= self.period

    def assigned(self, tp: TopicPartition) -> None:
        """A partition (re)assigned: its first records are checked, the topic may be a new one."""
        self._last_records.pop(tp, None)

    def same(self, tp: TopicPartition, mark: Mark, chunks: list[Chunk], cached: bool = True) -> bool:
        """Is what the broker holds at the mark still the record that was handed over there?"""
        if not mark.fingerprint or mark.last is None or (cached and self._verified.get(tp) == mark.last):
            return True
        at_mark = record_at(chunks, mark.last)
        seen = (mark.last, fingerprint(at_mark)) if at_mark is not None else self.probe(tp, mark.last)
        same = same_incarnation(mark.last, mark.fingerprint, seen)
        if same:
            self._verified[tp] = mark.last
        return same

    def start_new(self, tp: TopicPartition, mark: Mark) -> None:
        """Forget the old incarnation's mark; its next records are archived anew."""
        if self.marks.new_incarnation(tp.topic, tp.partition, mark.last):
            log.warning("%s:%d no longer holds the record handed over at offset %s: the topic was "
                        "recreated, or its log truncated; reading it again from its beginning and "
                        "archiving it as incarnation %d", tp.topic, tp.partition, mark.last,
                        mark.incarnation + 1)
        self._verified.pop(tp, None)

    def recreated_quiet_partitions(self, assignment: set[TopicPartition], now: float) -> list[TopicPartition]:
        """Quiet partitions whose mark no longer matches the broker's record: each has had its
        new incarnation started; the caller reads them again from their beginning."""
        recreated = []
        for tp in assignment:
            if now - self._last_records.setdefault(tp, now) < self.period \
                    or now - self._last_probe.get(tp, 0.0) < self.period:
                continue
            self._last_probe[tp] = now
            mark = self.marks.mark(tp.topic, tp.partition)
            try:
                same = mark.last is None or self.same(tp, mark, [], cached=False)
            except ProbeInconclusive as exc:
                log.warning("%s; checked again in %.0fs", exc, self.period)
                continue
            if not same:
                self.start_new(tp, mark)
                recreated.append(tp)
        return recreated
