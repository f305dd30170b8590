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

from sluice.batch import batch_id, pack
from sluice.ledger import Ledger
from sluice.records import Record
from sluice.redis_client import get_redis
from sluice.settings import Settings

log = logging.getLogger("sluice.bridge")


def _celery_send_split(bid: str) -> None:
    from tasks.app import app  # the bridge only sends tasks; it never runs them

    app.send_task("sluice.split", args=[bid], queue="io")


@dataclass
class _Buffer:
    records: list[Record] = field(default_factory=list)
    nbytes: int = 0
    since: float = 0.0


class Bridge:
    def __init__(self, settings: Settings, ledger: Ledger | None = None,
                 send_split: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.ledger = ledger or Ledger(get_redis(), settings)
        self._send_split = send_split or _celery_send_split
        self.buffers: dict[TopicPartition, _Buffer] = {}
        self.consumer: KafkaConsumer | None = None
        self.stopping = threading.Event()

    # --- hand-over -----------------------------------------------------------------------

    def hand_over(self, tp: TopicPartition, records: list[Record]) -> None:
        """Hand over records of one partition as batches within the size/count limits."""
        s = self.settings
        start = 0
        while start < len(records):
            end, nbytes = start, 0
            while end < len(records) and end - start < s.batch_max_records and (
                    end == start or nbytes + len(records[end].value or b"") <= s.batch_max_bytes):
                nbytes += len(records[end].value or b"")
                end += 1
            self._hand_over_one(tp, records[start:end])
            start = end

    def _hand_over_one(self, tp: TopicPartition, records: list[Record]) -> None:
        hwm = self.ledger.high_water_mark(tp.topic, tp.partition)
        while True:
            fresh = [r for r in records if hwm is None or r.offset > hwm]
            if len(fresh) < len(records):
                log.info("skipping %d records of %s:%d already handed over (replay)",
                         len(records) - len(fresh), tp.topic, tp.partition)
            if not fresh:
                return
            bid = batch_id(tp.topic, tp.partition, fresh[0].offset, fresh[-1].offset)
            if self.ledger.hand_over(bid, tp.topic, tp.partition, hwm, fresh[-1].offset, pack(fresh)):
                try:
                    self._send_split(bid)
                except Exception as exc:  # noqa: BLE001 - the batch is safe in the ledger
                    log.warning("could not enqueue split of %s (%s); the redrive sweep will", bid, exc)
                return
            hwm = self.ledger.high_water_mark(tp.topic, tp.partition)
            records = fresh

    def _hand_over_retrying(self, tp: TopicPartition, records: list[Record]) -> None:
        """Wait out a Redis outage: nothing is committed to Kafka until the hand-over succeeds."""
        for attempt in itertools.count():
            try:
                self.hand_over(tp, records)
                return
            except redis.RedisError as exc:
                if self.stopping.is_set():
                    raise
                delay = min(0.1 * 2 ** attempt, 5.0)
                log.warning("Redis unavailable (%s); hand-over of %s:%d retried in %.1fs",
                            exc, tp.topic, tp.partition, delay)
                time.sleep(delay)

    def flush(self, partitions: list[TopicPartition], force: bool = False) -> None:
        """Hand over the buffers that are full or old (all of them if `force`), then commit."""
        now = time.monotonic()
        s = self.settings
        offsets: dict[TopicPartition, OffsetAndMetadata] = {}
        for tp in partitions:
            buf = self.buffers.get(tp)
            if not buf or not buf.records:
                continue
            if force or buf.nbytes >= s.batch_max_bytes or len(buf.records) >= s.batch_max_records \
                    or now - buf.since >= s.batch_max_seconds:
                self._hand_over_retrying(tp, buf.records)
                offsets[tp] = OffsetAndMetadata(buf.records[-1].offset + 1, "", -1)
                self.buffers[tp] = _Buffer()
        if offsets and self.consumer is not None:
            try:
                self.consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as exc:
                # Handed over already: the ledger trims the replay this causes.
                log.warning("offset commit failed (%s); the replay will be trimmed", exc)

    # --- consume loop --------------------------------------------------------------------
    def _add(self, tp: TopicPartition, messages: list) -> None:
        buf = self.buffers.setdefault(tp, _Buffer())
        if not buf.records:
            buf.since = time.monotonic()
        for m in messages:
            buf.records.append(Record(m.offset, m.timestamp, m.key, m.value, list(m.headers or [])))
            buf.nbytes += len(m.value or b"")

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
            max_poll_records=s.batch_max_records,
            max_partition_fetch_bytes=max(s.batch_max_bytes, 1024 * 1024),
            client_id="sluice-bridge",
        )
        self.consumer.subscribe([s.topic], listener=_FlushOnRevoke(self))
        self._resend_inflight()
        log.info("bridge consuming %s as group %s", s.topic, s.group)
        try:
            while not stop.is_set():
                polled = self.consumer.poll(timeout_ms=min(100, int(s.batch_max_seconds * 1000)))
                for tp, messages in polled.items():
                    self._add(tp, messages)
                self.flush(list(self.buffers))
            self.flush(list(self.buffers), force=True)
        finally:
            self.consumer.close()

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
        pass
