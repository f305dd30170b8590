"""Backpressure: while the batches handed over and not yet compressed hold more than
SLUICE_MAX_INFLIGHT_BYTES, the bridge pauses its partitions, so data waits in Kafka instead of
filling Redis or the spool."""

from __future__ import annotations

import logging

import redis
from kafka import KafkaConsumer

from sluice.handover.batches import Batches

log = logging.getLogger("sluice.bridge")


class Backpressure:
    def __init__(self, batches: Batches, max_inflight_bytes: int) -> None:
        self.batches = batches
        self.max_inflight_bytes = max_inflight_bytes
        self.paused = False  # consumption paused: too much in flight
        self.pauses = 0  # times it paused

    def room_for(self, nbytes: int) -> bool:
        """Whether `nbytes` more fit under the bound (one batch always fits when nothing is in
        flight)."""
        try:
            inflight = self.batches.inflight_bytes()
        except redis.RedisError:
            return True  # the hand-over itself waits out the outage
        return inflight == 0 or inflight + nbytes <= self.max_inflight_bytes

    def pause(self, consumer: KafkaConsumer | None) -> None:
        """Pause every assigned partition (newly assigned ones too), so nothing more is fetched."""
        if consumer is None:
            return
        consumer.pause(*consumer.assignment())
        if self.paused:
            return
        self.paused = True
        self.pauses += 1
        log.info("pausing consumption: more than %d bytes in flight (SLUICE_MAX_INFLIGHT_BYTES)",
                 self.max_inflight_bytes)

    def resume_if_room(self, consumer: KafkaConsumer | None, waiting: int) -> None:
        """Resume once the largest buffered batch, `waiting` bytes, fits again."""
        if not self.paused or consumer is None:
            return
        if self.room_for(waiting):
            self.paused = False
            consumer.resume(*consumer.paused())
            log.info("resuming consumption")
