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
from typing import Callable

import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.subscription_state import ConsumerRebalanceListener
from kafka.coordinator.base import MemberState
from kafka.errors import CommitFailedError, KafkaError
from kafka.structs import OffsetAndMetadata

from bridge.backpressure import Backpressure
from bridge.batching import Buffer, cut
from bridge.incarnation import IncarnationGuard, Probe
from bridge.metrics import BridgeState, LagInput
from sluice.core import schema
from sluice.core.errors import SluiceError
from sluice.core.redis_client import get_redis
from sluice.core.schema import BatchState
from sluice.core.settings import Settings
from sluice.formats.records import Router
from sluice.handover.batches import Batches
from sluice.handover.kafka_batches import Chunk, last_record, use_raw_batches
from sluice.handover.kafka_probe import ProbeInconclusive, Prober, fingerprint
from sluice.handover.marks import Marks
from sluice.ops import repair
from sluice.ops.health import HealthFiles

log = logging.getLogger("sluice.bridge")

# poll() returns whole Kafka record batches (sluice.handover.kafka_batches); at most this many per call.
POLL_MAX_BATCHES = 1000
# How often the loop publishes its state for the metrics (bridge.metrics).
PUBLISH_SECONDS = 1.0


def _celery_send_split(bid: str) -> None:
    from tasks.app import enqueue  # the bridge only sends tasks; it never runs them

    enqueue("sluice.split", bid)


class Reread(SluiceError):
    """A partition turned out to be a new incarnation: read it again from its beginning."""


class NoRoom(SluiceError):
    """Handing this batch over would take the in-flight bytes past SLUICE_MAX_INFLIGHT_BYTES."""


class Bridge:
    def __init__(self, settings: Settings, client: redis.Redis | None = None,
                 send_split: Callable[[str], None] | None = None, probe: Probe | None = None) -> None:
        self.settings = settings
        client = client if client is not None else get_redis()
        self.marks = Marks(client)
        self.batches = Batches(client, settings)
        self._router = Router(settings.app_id_source, settings.timestamp_field, settings.record_max_bytes)
        self._send_split = send_split or _celery_send_split
        self._prober = probe or Prober(settings.kafka_bootstrap)
        self.incarnations = IncarnationGuard(self.marks, self._prober, settings.incarnation_check_seconds)
        self.backpressure = Backpressure(self.batches, settings.max_inflight_bytes)
        self.buffers: dict[TopicPartition, Buffer] = {}
        self.consumer: KafkaConsumer | None = None
        self.stopping = threading.Event()
        self._state = BridgeState({})
        self._published = 0.0
        self._joined_topics: set[str] | None = None  # what this consumer's first assignment covered
        self._topics_checked = 0.0
        self._new_topics_seen: float | None = None
        self.health = HealthFiles(settings.health_dir)

    # --- hand-over -----------------------------------------------------------------------

    def hand_over(self, tp: TopicPartition, chunks: list[Chunk], verify: bool = False) -> None:
        """Hand over the fetched batches of one partition, grouped within the size/count limits.

        `verify`: check the partition's incarnation first even if the records lie past the
        mark. Raises Reread if it is a new incarnation."""
        for i, run in enumerate(cut(chunks, self.settings)):
            self._hand_over_one(tp, run, verify and i == 0)

    def _hand_over_one(self, tp: TopicPartition, chunks: list[Chunk], verify: bool) -> None:
        mark = self.marks.mark(tp.topic, tp.partition)
        while True:
            hwm = mark.last
            if hwm is not None and (verify or chunks[0].first <= hwm) \
                    and not self.incarnations.same(tp, mark, chunks, cached=not verify):
                self.incarnations.start_new(tp, mark)
                raise Reread(tp)
            fresh = [c for c in chunks if hwm is None or c.last > hwm]
            if hwm is not None and chunks[0].first <= hwm:
                log.info("skipping offsets %d-%d of %s:%d: already handed over (replay)",
                         chunks[0].first, hwm, tp.topic, tp.partition)
            if not fresh:
                return
            first = fresh[0].first if hwm is None else max(fresh[0].first, hwm + 1)
            last = fresh[-1].last
            bid = schema.batch_id(tp.topic, tp.partition, first, last, mark.incarnation)
            payload = [c.data for c in fresh]
            if not self.backpressure.room_for(self.batches.in_flight_share(sum(len(part) for part in payload))):
                raise NoRoom(bid)
            at_last = last_record(fresh[-1])
            mark_print = fingerprint(at_last) if at_last is not None and at_last.offset == last else ""
            stamps = [ts for c in fresh if (ts := c.first_timestamp_ms) is not None]
            if self.batches.hand_over(bid, tp.topic, tp.partition, hwm, last, payload, mark_print,
                                      min(stamps) if stamps else None):
                try:
                    self._send_split(bid)
                except Exception as exc:  # noqa: BLE001 - the batch is safe in the ledger
                    log.warning("could not enqueue split of %s (%s); the redrive sweep will", bid, exc)
                return
            mark = self.marks.mark(tp.topic, tp.partition)
            chunks = fresh

    def _reread(self, tp: TopicPartition) -> None:
        """Drop what is buffered of a new incarnation and read it from its first record."""
        self.buffers[tp] = Buffer()
        if self.consumer is not None:
            self.consumer.seek_to_beginning(tp)

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
                if isinstance(exc, redis.RedisError) and repair.unverified(exc):
                    self._repair()
                    continue
                delay = min(0.1 * 2 ** attempt, 5.0)
                what = ("Redis unavailable" if isinstance(exc, redis.RedisError)
                        else "spool not writable" if isinstance(exc, OSError) else "replay undecided")
                log.warning("%s (%s); hand-over of %s:%d retried in %.1fs",
                            what, exc, tp.topic, tp.partition, delay)
                self.health.alive()  # waiting out an outage, not stuck: a restart would not help
                time.sleep(delay)

    def flush(self, partitions: list[TopicPartition], force: bool = False) -> None:
        """Hand over the buffers that are full or old (all of them if `force`), then commit."""
        now = time.monotonic()
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp in partitions:
            buf = self.buffers.get(tp)
            if not buf or not buf.chunks or not (force or buf.due(self.settings, now)):
                continue
            try:
                self._hand_over_retrying(tp, buf.chunks, buf.verify)
            except Reread:
                self._reread(tp)
                continue
            except NoRoom:
                self.backpressure.pause(self.consumer)
                break  # the buffers wait, uncommitted; what was handed over is trimmed later
            offsets[tp] = OffsetAndMetadata(buf.chunks[-1].last + 1, "", -1)
            self.buffers[tp] = Buffer()
        if offsets and self.consumer is not None:
            try:
                self.consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as exc:
                # Handed over already: the ledger trims the replay this causes.
                log.warning("offset commit failed (%s); the replay will be trimmed", exc)

    # --- rebalance -----------------------------------------------------------------------
    def revoked(self, partitions: list[TopicPartition]) -> None:
        """Hand over and commit what is buffered of partitions we are about to lose; not ready
        until the rebalance assigns partitions again."""
        self.health.ready(False)
        self.flush(partitions, force=True)
        for tp in partitions:
            self.buffers.pop(tp, None)

    def assigned(self, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.incarnations.assigned(tp)
        if self._joined_topics is None and self.consumer is not None:
            self._joined_topics = _existing_topics(self.consumer)
        self.health.ready(True)  # it holds its partitions (with more bridges than partitions, none)

    # --- consume loop --------------------------------------------------------------------
    def _add(self, tp: TopicPartition, chunks: list[Chunk]) -> None:
        buf = self.buffers.setdefault(tp, Buffer())
        now = time.monotonic()
        if self.incarnations.records_came(tp, now):
            buf.verify = True  # the first records after a rebalance or a quiet spell
        buf.add(chunks, now)

    def _check_quiet_partitions(self) -> None:
        if self.consumer is None:
            return
        for tp in self.incarnations.recreated_quiet_partitions(self.consumer.assignment(), time.monotonic()):
            self._reread(tp)

    def _connect(self) -> KafkaConsumer:
        """A consumer of the group, subscribed to the topic list or pattern."""
        s = self.settings
        consumer = KafkaConsumer(
            bootstrap_servers=s.kafka_bootstrap.split(","),
            group_id=s.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=s.kafka_heartbeat_interval_ms,
            max_poll_records=POLL_MAX_BATCHES,
            max_partition_fetch_bytes=max(s.batch_max_bytes, 1024 * 1024),
            # How soon a new topic (matching the pattern, or listed and created later) is seen.
            metadata_max_age_ms=int(s.topic_refresh_seconds * 1000),
            client_id="sluice-bridge",
            # A listed topic that does not exist yet is waited for, never created by asking
            # about it (with the broker's default partitions, or from a typo in SLUICE_TOPIC).
            allow_auto_create_topics=False,
        )
        use_raw_batches(consumer)
        if s.topic_pattern is not None:
            consumer.subscribe(pattern=f"^(?:{s.topic_pattern})$", listener=_Rebalance(self))
        else:
            consumer.subscribe(s.topics, listener=_Rebalance(self))
        self._joined_topics = None
        return consumer

    def _rejoin_if_topics_grew(self) -> None:
        """A topic it reads (matching, or listed) appeared since this consumer joined, and a
        topic-refresh period later the group has still not given this bridge any of its
        partitions: hand over and commit what is buffered, leave the group and join again with a
        fresh consumer. Apache
        Kafka rebalances on its own; Tansu, the local broker, keeps a member's first
        subscription and never assigns a new topic's partitions to it."""
        now = time.monotonic()
        if self.consumer is None or self._joined_topics is None or now - self._topics_checked < \
                self.settings.topic_refresh_seconds:
            return
        self._topics_checked = now
        assigned = {tp.topic for tp in self.consumer.assignment()}
        new = _existing_topics(self.consumer) - self._joined_topics - assigned
        if not new:
            self._new_topics_seen = None
            return
        if self._new_topics_seen is None:
            self._new_topics_seen = now  # the group may be rebalancing right now: give it a period
            return
        coordinator = self.consumer._coordinator
        if coordinator.state is not MemberState.STABLE or coordinator.need_rejoin():
            # Its own rejoin is under way (kafka-python rejoins when a pattern matches a new
            # topic): closing mid-rebalance cancels its SyncGroup, and Tansu then holds the
            # group for every new member until the rebalance timeout (5 min). Wait it out.
            return
        log.info("new topics %s to read and none of their partitions assigned; rejoining the group", sorted(new))
        self._new_topics_seen = None
        self.revoked(list(self.buffers))
        self.consumer.close()
        self.consumer = self._connect()

    def _until_it_answers(self, what: str, step: Callable[[], None]) -> bool:
        """Run `step` until neither Kafka nor Redis refuses it, as the hand-over waits out an
        outage: a bridge started while either is down waits for it instead of exiting (a restart
        would not bring it back). False if stopped while waiting."""
        attempt = 0
        while True:
            try:
                step()
                return True
            except (KafkaError, redis.RedisError) as exc:
                if isinstance(exc, redis.RedisError) and repair.unverified(exc):
                    self._repair()
                    continue
                delay = min(0.5 * 2 ** attempt, 5.0)
                attempt += 1
                log.warning("%s failed (%s: %s); retried in %.1fs", what, type(exc).__name__, exc, delay)
                self.health.alive()  # waiting, not stuck
                if self.stopping.wait(delay):
                    return False

    def run(self, stop: threading.Event) -> None:
        self.stopping = stop
        s = self.settings

        def connect() -> None:
            self.consumer = self._connect()

        if not self._until_it_answers(f"connecting to Kafka at {s.kafka_bootstrap}", connect) \
                or not self._until_it_answers("checking Redis's state against the spool", self._repair) \
                or not self._until_it_answers("re-enqueueing batches in flight", self._resend_inflight):
            if self.consumer is not None:
                self.consumer.close()
            return
        assert self.consumer is not None
        log.info("bridge consuming %s as group %s", s.topic, s.group)
        try:
            while not stop.is_set():
                polled = self.consumer.poll(timeout_ms=min(100, int(s.batch_max_seconds * 1000)))
                for tp, chunks in polled.items():
                    self._add(tp, chunks)
                waiting = min(max((b.nbytes for b in self.buffers.values()), default=0), s.batch_max_bytes)
                self.backpressure.resume_if_room(self.consumer, waiting)
                self.flush(list(self.buffers))
                self._check_quiet_partitions()
                self._rejoin_if_topics_grew()
                self._publish()
                self.health.alive()
            self.health.ready(False)
            self.flush(list(self.buffers), force=True)
        finally:
            self.health.ready(False)
            self.consumer.close()
            if isinstance(self._prober, Prober):
                self._prober.close()

    def state(self) -> BridgeState:
        """What the metrics need of this bridge, as of its loop's last publication."""
        return self._state

    def _publish(self) -> None:
        """Once a second, replace the published state (read by other threads) with a new one."""
        now = time.monotonic()
        if self.consumer is None or now - self._published < PUBLISH_SECONDS:
            return
        self._published = now
        paused = self.backpressure.paused
        inputs = {}
        for tp in self.consumer.assignment():
            buf = self.buffers.get(tp)
            first = buf.chunks[0] if buf is not None and buf.chunks else None
            inputs[tp] = LagInput(None if paused else self.consumer.highwater(tp),
                                  first.first if first is not None else None,
                                  first.first_timestamp_ms if first is not None else None)
        self._state = BridgeState(inputs, paused, self.backpressure.pauses)

    def _repair(self) -> None:
        """Redis refused a hand-over: its state is not yet checked against the spool (a restarted
        or replaced server, sluice.ops.repair). Repair it, or wait for whoever does; if this
        bridge repaired it, send the split of every batch in flight again."""
        self.health.alive()  # repairing or waiting for it, not stuck
        report = repair.ensure_verified(self.batches.r, self.settings, self._router)
        for bid in report.resend if report is not None else []:
            self._send_split(bid)

    def _resend_inflight(self) -> None:
        """A bridge that died between hand-over and enqueue left batches with no task."""
        stale = [bid for bid in self.batches.stale(older_than=0)
                 if self.batches.state(bid) == BatchState.HANDED]
        for bid in stale:
            self._send_split(bid)
        if stale:
            log.info("re-enqueued %d batches still in flight", len(stale))


def _existing_topics(consumer: KafkaConsumer) -> set[str]:
    """The subscribed topics the consumer's metadata knows partitions of: for a pattern, those
    that match; for a list, those of its topics that exist (a listed topic created later is
    in the subscription from the start, so the subscription alone cannot tell it is new). Read
    from the metadata cache, which SLUICE_TOPIC_REFRESH_SECONDS keeps fresh: no request, so it
    is safe inside a rebalance callback."""
    cluster = consumer._client.cluster  # its public partitions_for_topic may block on a fetch
    return {t for t in consumer.subscription() or () if cluster.partitions_for_topic(t)}


class _Rebalance(ConsumerRebalanceListener):
    """kafka-python's rebalance callbacks, passed on to the bridge."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge

    def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        self.bridge.revoked(list(revoked))

    def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        self.bridge.assigned(list(assigned))
