"""Consume, batch per partition, hand over (claim-check + ledger), enqueue split, then commit.

Offsets are committed only after a batch is durably handed over. If the bridge dies between
hand-over and commit, Kafka redelivers those records; the ledger's high-water mark says they
were handed over already, so they are trimmed instead of archived twice.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from bridge.incarnation import ProbeInconclusive, Prober, fingerprint, same_incarnation
from sluice.batch import batch_id
from sluice.kafka_batches import Chunk, last_record, record_at, use_raw_batches
from sluice.ledger import Ledger, Mark
from sluice.redis_client import get_redis
from sluice.settings import Settings

log = logging.getLogger("sluice.bridge")

# poll() returns whole Kafka record batches (sluice.kafka_batches); at most this many per call.
POLL_MAX_BATCHES = 1000


def _celery_send_split(bid: str) -> None:
    from tasks.app import enqueue  # the bridge only sends tasks; it never runs them
    from tasks.deps import ledger

    enqueue(ledger(), "sluice.split", bid)


@dataclass
class _Buffer:
    chunks: list[Chunk] = field(default_factory=list)  # whole Kafka record batches, in order
    nbytes: int = 0
    since: float = 0.0
    verify: bool = False  # first records after a quiet spell: check the incarnation first


class Reread(Exception):
    """A partition turned out to be a new incarnation: read it again from its beginning."""


class NoRoom(Exception):
    """Handing this batch over would take the in-flight bytes past SLUICE_MAX_INFLIGHT_BYTES."""


class Bridge:
    def __init__(self, settings: Settings, ledger: Ledger | None = None,
                 send_split: Callable[[str], None] | None = None,
                 probe: Callable[[TopicPartition, int], tuple[int, str] | None] | None = None) -> None:
        self.settings = settings
        self.ledger = ledger or Ledger(get_redis(), settings)
        self._send_split = send_split or _celery_send_split
        self._probe = probe or Prober(settings.kafka_bootstrap)
        self._verified: dict[TopicPartition, int] = {}  # marks found to be of this incarnation
        self._last_records: dict[TopicPartition, float] = {}  # when records last came
        self._last_probe: dict[TopicPartition, float] = {}
        self.buffers: dict[TopicPartition, _Buffer] = {}
        self.consumer: KafkaConsumer | None = None
        self.stopping = threading.Event()
        self.paused = False  # consumption paused: too much in flight

    # --- hand-over -----------------------------------------------------------------------

    def hand_over(self, tp: TopicPartition, chunks: list[Chunk], verify: bool = False) -> None:
        """Hand over the fetched batches of one partition, grouped within the size/count limits
        (a Kafka batch is never cut: the payload is whole batches, as the broker sent them).

        `verify`: check the partition's incarnation first even if the records lie past the
        mark. Raises Reread if it is a new incarnation."""
        s = self.settings
        start = 0
        while start < len(chunks):
            end, nbytes = start, 0
            while end < len(chunks) and (end == start or (
                    nbytes + len(chunks[end].data) <= s.batch_max_bytes
                    and chunks[end].last - chunks[start].first < s.batch_max_records)):
                nbytes += len(chunks[end].data)
                end += 1
            self._hand_over_one(tp, chunks[start:end], verify and start == 0)
            start = end

    def _hand_over_one(self, tp: TopicPartition, chunks: list[Chunk], verify: bool) -> None:
        mark = self.ledger.mark(tp.topic, tp.partition)
        while True:
            hwm = mark.last
            if hwm is not None and (verify or chunks[0].first <= hwm) \
                    and not self._same_incarnation(tp, mark, chunks, cached=not verify):
                self._start_incarnation(tp, mark)
                raise Reread(tp)
            fresh = [c for c in chunks if hwm is None or c.last > hwm]
            if hwm is not None and chunks[0].first <= hwm:
                log.info("skipping offsets %d-%d of %s:%d: already handed over (replay)",
                         chunks[0].first, hwm, tp.topic, tp.partition)
            if not fresh:
                return
            first = fresh[0].first if hwm is None else max(fresh[0].first, hwm + 1)
            last = fresh[-1].last
            bid = batch_id(tp.topic, tp.partition, first, last, mark.incarnation)
            payload = [c.data for c in fresh]
            if not self._room_for(sum(len(part) for part in payload)):
                raise NoRoom(bid)
            at_last = last_record(fresh[-1])
            mark_print = fingerprint(at_last) if at_last is not None and at_last.offset == last else ""
            if self.ledger.hand_over(bid, tp.topic, tp.partition, hwm, last, payload, mark_print):
                try:
                    self._send_split(bid)
                except Exception as exc:  # noqa: BLE001 - the batch is safe in the ledger
                    log.warning("could not enqueue split of %s (%s); the redrive sweep will", bid, exc)
                return
            mark = self.ledger.mark(tp.topic, tp.partition)
            chunks = fresh

    def _same_incarnation(self, tp: TopicPartition, mark: Mark, chunks: list[Chunk],
                          cached: bool = True) -> bool:
        """Is what the broker holds at the mark still the record that was handed over there?"""
        if not mark.fingerprint or (cached and self._verified.get(tp) == mark.last):
            return True
        at_mark = record_at(chunks, mark.last)
        seen = (mark.last, fingerprint(at_mark)) if at_mark is not None else self._probe(tp, mark.last)
        same = same_incarnation(mark.last, mark.fingerprint, seen)
        if same:
            self._verified[tp] = mark.last
        return same

    def _start_incarnation(self, tp: TopicPartition, mark: Mark) -> None:
        if self.ledger.new_incarnation(tp.topic, tp.partition, mark.last):
            log.warning("%s:%d no longer holds the record handed over at offset %d: the topic was "
                        "recreated, or its log truncated; reading it again from its beginning and "
                        "archiving it as incarnation %d", tp.topic, tp.partition, mark.last,
                        mark.incarnation + 1)
        self._verified.pop(tp, None)

    def _reread(self, tp: TopicPartition) -> None:
        """Drop what is buffered of a new incarnation and read it from its first record."""
        self.buffers[tp] = _Buffer()
        if self.consumer is not None:
            self.consumer.seek_to_beginning(tp)

    def _check_quiet_partitions(self) -> None:
        """A partition quiet for a while may have been deleted and recreated under us, with its
        new log not yet past our position: compare the record at its mark with the broker's."""
        if self.consumer is None:
            return
        now, period = time.monotonic(), self.settings.incarnation_check_seconds
        for tp in self.consumer.assignment():
            if now - self._last_records.setdefault(tp, now) < period \
                    or now - self._last_probe.get(tp, 0.0) < period:
                continue
            self._last_probe[tp] = now
            mark = self.ledger.mark(tp.topic, tp.partition)
            try:
                same = mark.last is None or self._same_incarnation(tp, mark, [], cached=False)
            except ProbeInconclusive as exc:
                log.warning("%s; checked again in %.0fs", exc, period)
                continue
            if not same:
                self._start_incarnation(tp, mark)
                self._reread(tp)
    def _hand_over_retrying(self, tp: TopicPartition, chunks: list[Chunk], verify: bool) -> None:
        """Wait out a Redis outage, a full spool disk or a broker that cannot say which incarnation
        a replay belongs to: nothing is committed to Kafka until the hand-over succeeds."""
        for attempt in itertools.count():
            try:
                self.hand_over(tp, chunks, verify)
                return
            except (redis.RedisError, OSError, ProbeInconclusive) as exc:
                if self.stopping.is_set():
                    raise
                delay = min(0.1 * 2 ** attempt, 5.0)
                what = ("Redis unavailable" if isinstance(exc, redis.RedisError)
                        else "spool not writable" if isinstance(exc, OSError) else "replay undecided")
                log.warning("%s (%s); hand-over of %s:%d retried in %.1fs",
                            what, exc, tp.topic, tp.partition, delay)
                time.sleep(delay)

    def flush(self, partitions: list[TopicPartition], force: bool = False) -> None:
        """Hand over the buffers that are full or old (all of them if `force`), then commit."""
        now = time.monotonic()
        s = self.settings
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp in partitions:
            buf = self.buffers.get(tp)
            if not buf or not buf.chunks:
                continue
            if force or buf.nbytes >= s.batch_max_bytes \
                    or buf.chunks[-1].last - buf.chunks[0].first >= s.batch_max_records \
                    or now - buf.since >= s.batch_max_seconds:
                try:
                    self._hand_over_retrying(tp, buf.chunks, buf.verify)
                except Reread:
                    self._reread(tp)
                    continue
                except NoRoom:
                    self._pause()
                    break  # the buffers wait, uncommitted; what was handed over is trimmed later
                offsets[tp] = OffsetAndMetadata(buf.chunks[-1].last + 1, "", -1)
                self.buffers[tp] = _Buffer()
        if offsets and self.consumer is not None:
            try:
                self.consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as exc:
                # Handed over already: the ledger trims the replay this causes.
                log.warning("offset commit failed (%s); the replay will be trimmed", exc)

    # --- backpressure --------------------------------------------------------------------
    def _room_for(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit under SLUICE_MAX_INFLIGHT_BYTES (one batch always fits
        when nothing is in flight)."""
        try:
            inflight = self.ledger.inflight_bytes()
        except redis.RedisError:
            return True  # the hand-over itself waits out the outage
        return inflight == 0 or inflight + nbytes <= self.settings.max_inflight_bytes

    def _pause(self) -> None:
        """Pause every assigned partition (newly assigned ones too), so nothing more is fetched."""
        if self.consumer is None:
            return
        self.consumer.pause(*self.consumer.assignment())
        if self.paused:
            return
        self.paused = True
        log.info("pausing consumption: more than %d bytes in flight (SLUICE_MAX_INFLIGHT_BYTES)",
                 self.settings.max_inflight_bytes)

    def _resume_if_room(self) -> None:
        if not self.paused or self.consumer is None:
            return
        waiting = min(max((b.nbytes for b in self.buffers.values()), default=0),
                      self.settings.batch_max_bytes)
        if self._room_for(waiting):
            self.paused = False
            self.consumer.resume(*self.consumer.paused())
            log.info("resuming consumption")

    # --- consume loop --------------------------------------------------------------------
    def _add(self, tp: TopicPartition, chunks: list[Chunk]) -> None:
        buf = self.buffers.setdefault(tp, _Buffer())
        now = time.monotonic()
        last = self._last_records.get(tp)
        if last is None or now - last >= self.settings.incarnation_check_seconds:
            buf.verify = True  # the first records after a rebalance or a quiet spell
        self._last_records[tp] = now
        if not buf.chunks:
            buf.since = now
        buf.chunks.extend(chunks)
        buf.nbytes += sum(len(c.data) for c in chunks)

    def run(self, stop: threading.Event) -> None:
        self.stopping = stop
        s = self.settings
        self.consumer = KafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap.split(","),
            group_id=s.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=s.kafka_heartbeat_interval_ms,
            max_poll_records=POLL_MAX_BATCHES,
            max_partition_fetch_bytes=max(s.batch_max_bytes, 1024 * 1024),
            client_id="sluice-bridge",
        )
        use_raw_batches(self.consumer)
        self.consumer.subscribe([s.topic], listener=_FlushOnRevoke(self))
        self._resend_inflight()
        log.info("bridge consuming %s as group %s", s.topic, s.group)
        try:
            while not stop.is_set():
                polled = self.consumer.poll(timeout_ms=min(100, int(s.batch_max_seconds * 1000)))
                for tp, chunks in polled.items():
                    self._add(tp, chunks)
                self._resume_if_room()
                self.flush(list(self.buffers))
                self._check_quiet_partitions()
            self.flush(list(self.buffers), force=True)
        finally:
            self.consumer.close()
            if isinstance(self._probe, Prober):
                self._probe.close()

    def _resend_inflight(self) -> None:
        """A bridge that died between hand-over and enqueue left batches with no task."""
        stale = [bid for bid in self.ledger.stale_batches(older_than=0)
                 if self.ledger.state(bid) == "handed"]
        for bid in stale:
            self._send_split(bid)
        if stale:
            log.info("re-enqueued %d batches still in flight", len(stale))


class _FlushOnRevoke(ConsumerRebalanceListener):
    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def on_partitions_revoked(self, revoked) -> None:
        self.bridge.flush(list(revoked), force=True)
        for tp in revoked:
            self.bridge.buffers.pop(tp, None)

    def on_partitions_assigned(self, assigned) -> None:
        for tp in assigned:  # its first records are checked: the topic may be a new one
            self.bridge._last_records.pop(tp, None)
