"""Records kafka-python cannot decode are delivered with their flaw, built with kafka-python's
own batch builder so the patch is tested against the pinned library."""

from __future__ import annotations

import base64
import json

import pytest
from kafka.consumer.fetcher import ConsumerRecord
from kafka.errors import CorruptRecordError
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from sluice.formats.records import QUARANTINE_APP, Record, Router
from sluice.handover import undecodable
from sluice.handover.undecodable import RawName, record_of

TS = 1_795_000_000_000


def batch_bytes(headers_of_middle: list[tuple[str, bytes]]) -> bytes:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=1 << 20)
    builder.append(0, TS, None, b'{"app":"a","n":0}', [])
    builder.append(1, TS + 1, b"k", b'{"app":"a","n":1}', headers_of_middle)
    builder.append(2, TS + 2, None, b'{"app":"a","n":2}', [("ok", b"1")])
    return bytes(builder.build())


def read(data: bytes) -> list:
    return list(DefaultRecordBatch(data))


@pytest.fixture(autouse=True)
def installed():
    undecodable.install()


def consumer_record(r) -> ConsumerRecord:
    return ConsumerRecord("logs", 0, 0, r.offset, r.timestamp, 0, r.key, r.value, r.headers,
                          None, -1, -1, -1)


def test_a_header_name_that_is_not_utf8_no_longer_stops_the_batch():
    data = batch_bytes([("h!!", b"v"), ("fine", b"w")]).replace(b"h!!", b"h\xff\xfe")
    records = read(data)
    assert [r.offset for r in records] == [0, 1, 2]
    name, value = records[1].headers[0]
    assert isinstance(name, RawName) and name.raw == b"h\xff\xfe" and value == b"v"
    assert records[1].headers[1] == ("fine", b"w") and records[1].key == b"k"
    assert records[1].timestamp == TS + 1 and records[2].headers == [("ok", b"1")]


def test_without_the_patch_kafka_python_raises(monkeypatch):
    data = batch_bytes([("h!!", b"v")]).replace(b"h!!", b"h\xff\xfe")
    monkeypatch.setattr(DefaultRecordBatch, "_read_msg", undecodable._read_msg)
    with pytest.raises(CorruptRecordError):
        read(data)


def test_a_record_that_cannot_be_framed_is_kept_raw():
    data = bytearray(batch_bytes([("hdr", b"value")]))
    at = data.index(b"hdr") - 1  # the header name's length varint: make it run past the record
    data[at] = 0x7E
    records = read(bytes(data))
    assert [r.offset for r in records] == [0, 1, 2]
    assert records[1].headers == [(undecodable.UNREADABLE, None)]
    assert b"hdr" in records[1].value
    flawed = record_of(consumer_record(records[1]))
    assert flawed.flaw == "unreadable_record" and flawed.value == records[1].value


def test_a_flawed_record_goes_to_quarantine_with_every_byte():
    data = batch_bytes([("h!!", b"v")]).replace(b"h!!", b"h\xff\xfe")
    flawed = record_of(consumer_record(read(data)[1]))
    assert flawed == Record(1, TS + 1, b"k", b'{"app":"a","n":1}', [(b"h\xff\xfe", b"v")],
                            "undecodable_header")
    groups = Router().group([flawed], "logs", 0)
    [(app, _)] = groups
    assert app == QUARANTINE_APP
    envelope = json.loads(groups[(app, _)][0])
    assert envelope["reason"] == "undecodable_header" and envelope["offset"] == 1
    assert base64.b64decode(envelope["value_b64"]) == b'{"app":"a","n":1}'
    assert envelope["headers"] == [["h\\xff\\xfe", base64.b64encode(b"v").decode(),
                                    base64.b64encode(b"h\xff\xfe").decode()]]


def test_the_split_reads_a_batch_with_a_flawed_record_through_the_patch():
    from sluice.handover.kafka_batches import records

    data = batch_bytes([("h!!", b"v")]).replace(b"h!!", b"h\xff\xfe")
    # kafka-python's builder left the CRC of the original name: redo it, as a producer would.
    import crc32c
    data = data[:17] + crc32c.crc32c(data[21:]).to_bytes(4, "big") + data[21:]
    back = list(records(data, 0, 2))
    assert [r.offset for r in back] == [0, 1, 2]
    assert back[1].flaw == "undecodable_header" and back[1].headers == [(b"h\xff\xfe", b"v")]
    assert back[0].flaw == back[2].flaw == "" and back[2].headers == [("ok", b"1")]


def test_a_record_whose_length_is_corrupt_goes_to_quarantine_whole():
    """The CRC holds but a record's length is wrong: aiokafka's reader raises an error of its
    own (not kafka-python's), which used to fail the split; now every byte of the batch's
    records reaches the quarantine."""
    import crc32c

    from sluice.handover.kafka_batches import records
    data = bytearray(batch_bytes([("x", b"1")]))
    data[61] = 0x7E  # the first record's length (a varint), now longer than the batch
    data = bytes(data)
    data = data[:17] + crc32c.crc32c(data[21:]).to_bytes(4, "big") + data[21:]
    back = list(records(data, 0, 2))
    assert back and {r.flaw for r in back} == {"unreadable_record"}
    assert b"".join(r.value for r in back) == data[61:]
