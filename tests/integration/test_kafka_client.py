"""sluice's two uses of kafka-python against a real broker: raw record batches for the bridge,
and the incarnation probe (it answers, or says it cannot)."""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Iterator

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from devstack.local import LocalStack
from sluice.formats.records import Record
from sluice.handover.kafka_batches import records, use_raw_batches
from sluice.handover.kafka_probe import ProbeInconclusive, Prober, fingerprint

pytestmark = pytest.mark.integration
TP = TopicPartition("t", 0)


@pytest.fixture
def kafka(tmp_path: Path) -> Iterator[LocalStack]:
    stack = LocalStack(tmp_path / "stack")
    try:
        stack.start_kafka()
        stack.create_topic("t", 1)
        producer = KafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=50)
        for i in range(100):  # a few batches of many records each
            producer.send("t", key=b"k%d" % i, value=b"v%d" % i, partition=0, timestamp_ms=1_000 + i)
        producer.flush()
        producer.close()
        yield stack
    finally:
        stack.close()


def test_a_record_inside_the_log_is_fingerprinted(kafka: LocalStack) -> None:
    probe = Prober(kafka.bootstrap)
    try:
        expected = fingerprint(Record(42, 1_042, b"k42", b"v42", []))
        assert probe(TP, 42) == (42, expected)
        assert probe(TP, 99) == (99, fingerprint(Record(99, 1_099, b"k99", b"v99", [])))
    finally:
        probe.close()


def test_past_the_end_is_told_from_the_fetch_reply_not_the_timeout(kafka: LocalStack) -> None:
    probe = Prober(kafka.bootstrap, timeout=30)
    try:
        assert probe(TP, 99) is not None  # a high watermark from this probe must not be reused
        began = time.monotonic()
        assert probe(TP, 100) is None
        assert probe(TP, 5_000) is None
        assert time.monotonic() - began < 30, "answered by the broker, not by giving up"
    finally:
        probe.close()


def test_a_broker_that_does_not_answer_is_inconclusive(kafka: LocalStack) -> None:
    probe = Prober(kafka.bootstrap, timeout=3)
    try:
        assert probe(TP, 10) is not None
        broker = kafka.service("tansu")
        broker.proc.send_signal(signal.SIGSTOP)
        try:
            with pytest.raises(ProbeInconclusive):
                probe(TP, 50)
        finally:
            broker.proc.send_signal(signal.SIGCONT)
    finally:
        probe.close()


@pytest.mark.parametrize("start", [0, 42])
def test_the_bridge_s_consumer_returns_whole_batches_that_read_back_as_the_records(kafka, start):
    consumer = KafkaConsumer(bootstrap_servers=kafka.bootstrap, group_id=None, enable_auto_commit=False,
                             auto_offset_reset="earliest")
    use_raw_batches(consumer)
    consumer.assign([TP])
    consumer.seek(TP, start)  # 42 lies inside a batch: its earlier records are not ours
    chunks = []
    deadline = time.monotonic() + 30
    while (not chunks or chunks[-1].last < 99) and time.monotonic() < deadline:
        chunks += consumer.poll(timeout_ms=500).get(TP, [])
    consumer.close()
    assert len(chunks) < 100 - start, "batches, not records"
    assert chunks[0].first == start and chunks[-1].last == 99
    got = [r for c in chunks for r in records(c.data, c.first, c.last)]
    assert [(r.offset, r.key, r.value, r.timestamp) for r in got] == [
        (i, b"k%d" % i, b"v%d" % i, 1_000 + i) for i in range(start, 100)]
