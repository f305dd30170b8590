"""Unit tests for sluice.core.schema's batch ids and sluice.handover.kafka_batches: the claim-check
payload (Kafka record batches as fetched) read back record for record, and the deterministic batch id."""

from __future__ import annotations

import random

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.legacy_records import LegacyRecordBatchBuilder

from sluice.core.schema import batch_id, parse_batch_id
from sluice.formats.records import Record
from sluice.handover.kafka_batches import Chunk, last_record, record_at, records

CODECS = {"none": 0, "gzip": 1, "snappy": 2, "lz4": 3, "zstd": 4}


def kafka_batch(recs: list[Record], base: int | None = None, codec: str = "none",
                control: bool = False) -> bytes:
    """Built by a producer's batch builder (aiokafka's: it has every codec), as a broker serves it."""
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=CODECS[codec], is_transactional=control,
                                        producer_id=7 if control else -1, producer_epoch=0 if control else -1,
                                        base_sequence=-1, batch_size=1 << 30)
    base = recs[0].offset if base is None else base
    for r in recs:
        builder.append(r.offset - base, r.timestamp_ms, r.key, r.value, r.headers)
    data = bytearray(builder.build())
    data[0:8] = base.to_bytes(8, "big")  # the broker assigns the base offset
    if control:  # the control flag (attributes bit 5), with the CRC it covers redone
        import crc32c
        attributes = int.from_bytes(data[21:23], "big") | 0x20
        data[21:23] = attributes.to_bytes(2, "big")
        data[17:21] = crc32c.crc32c(bytes(data[21:])).to_bytes(4, "big")
    return bytes(data)


def read(payload: bytes, first: int, last: int) -> list[Record]:
    return [Record(r.offset, r.timestamp, r.key, r.value, r.headers) for r in records(payload, first, last)]


def as_record(r) -> Record:
    return Record(r.offset, r.timestamp, r.key, r.value, r.headers)


MIXED = [
    Record(0, 1_700_000_000_000, None, b'{"app":"a"}', []),
    Record(1, 1_700_000_000_001, b"key", b"\x00\xff\xfe binary \n value", [("x-app", b"billing")]),
    Record(2, 0, b"", b"", [("h", b""), ("h", b"\x00"), ("\u00e9t\u00e9", b"\xff")]),
    Record(3, 5, b"\xff" * 3, b"x" * 100_000, [("n", None)]),
    Record(4, 6, b"k", None, []),
]


@pytest.mark.parametrize("codec", list(CODECS))
def test_every_field_comes_back_whatever_the_producer_compression(codec):
    back = read(kafka_batch(MIXED, codec=codec), 0, 4)
    assert back == MIXED
    assert all(type(h) is tuple and type(h[0]) is str for r in back for h in r.headers)


def test_only_the_offsets_of_the_batch_id_are_read():
    payload = kafka_batch(MIXED[:3]) + kafka_batch(MIXED[3:])
    assert [r.offset for r in records(payload, 1, 3)] == [1, 2, 3]
    assert read(payload, 0, 4) == MIXED


def test_random_batches_round_trip():
    rng = random.Random(7)
    recs = [Record(1000 + i, rng.randrange(0, 2 ** 41), rng.choice([None, rng.randbytes(rng.randrange(0, 20))]),
                   rng.randbytes(rng.randrange(0, 2000)),
                   [(f"h{j}", rng.randbytes(rng.randrange(0, 10))) for j in range(rng.randrange(0, 3))])
            for i in range(500)]
    payload = b"".join(kafka_batch(recs[i:i + 37]) for i in range(0, 500, 37))
    assert read(payload, 1000, 1499) == recs


def test_transaction_markers_are_not_records():
    marker = kafka_batch([Record(3, 9, b"\x00\x00\x00\x01", b"\x00\x00\x00\x00\x00\x00", [])], control=True)
    payload = kafka_batch(MIXED[:3]) + marker + kafka_batch(MIXED[4:])
    assert [r.offset for r in records(payload, 0, 4)] == [0, 1, 2, 4]


def test_a_legacy_message_set_is_read_too():
    builder = LegacyRecordBatchBuilder(magic=1, compression_type=0, batch_size=1 << 20)
    builder.append(0, timestamp=1_700_000_000_000, key=b"k", value=b'{"app":"a"}')
    data = bytearray(builder.build())
    data[0:8] = (41).to_bytes(8, "big")
    [record] = records(bytes(data), 0, 100)
    assert (record.offset, record.key, record.value) == (41, b"k", b'{"app":"a"}')


def test_a_batch_cut_off_at_the_end_is_not_read():
    whole = kafka_batch(MIXED[:2])
    assert [r.offset for r in records(whole + kafka_batch(MIXED[2:])[:-5], 0, 4)] == [0, 1]


def test_the_record_at_an_offset_and_the_last_one():
    chunks = [Chunk(0, 2, kafka_batch(MIXED[:3])), Chunk(3, 4, kafka_batch(MIXED[3:]))]
    assert as_record(record_at(chunks, 3)) == MIXED[3] and record_at(chunks, 9) is None
    assert as_record(last_record(chunks[1])) == MIXED[4]
    compacted = Chunk(0, 9, kafka_batch(MIXED[:3], base=0))  # its last record compacted away
    assert as_record(last_record(compacted)) == MIXED[2]


def test_batch_id_format():
    assert batch_id("logs", 3, 100, 199) == "logs:3:100-199"


@pytest.mark.parametrize("topic", ["logs", "app.logs-v2", "my_topic.with.dots", "a-b-c", "x" * 249])
@pytest.mark.parametrize("partition, first, last", [(0, 0, 0), (17, 123, 456), (2 ** 31 - 1, 2 ** 62, 2 ** 63 - 1)])
def test_batch_id_round_trip(topic, partition, first, last):
    assert parse_batch_id(batch_id(topic, partition, first, last)) == (topic, partition, first, last)


def test_batch_id_is_deterministic_and_distinct():
    assert batch_id("t", 1, 2, 3) == batch_id("t", 1, 2, 3)
    ids = {batch_id("t", p, f, last) for p in range(3) for f in range(3) for last in range(3, 6)}
    assert len(ids) == 27


def test_a_recreated_topic_s_batches_carry_its_incarnation():
    assert batch_id("logs", 2, 0, 9) == "logs:2:0-9"
    assert batch_id("logs", 2, 0, 9, incarnation=3) == "logs:2:0-9@3"
    assert parse_batch_id("logs:2:0-9@3") == ("logs", 2, 0, 9)
