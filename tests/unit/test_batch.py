"""Unit tests for sluice.batch: the claim-check payload and its deterministic id."""

from __future__ import annotations

import random

import pytest

from sluice.batch import batch_id, pack, parse_batch_id, unpack
from sluice.records import Record


def test_round_trip_mixed_records():
    records = [
        Record(0, 1_700_000_000_000, None, b'{"app":"a"}', []),
        Record(1, 1_700_000_000_001, b"key", b"\x00\xff\xfe binary \n value", [("x-app", b"billing")]),
        Record(2, 0, b"", b"", [("h", b""), ("h", b"\x00"), ("\u00e9t\u00e9", b"\xff")]),
        Record(2 ** 62, -1, b"\xff" * 3, b"x" * 100_000, [("n", None)]),
    ]
    back = unpack(pack(records))
    assert back == records
    assert all(type(r) is Record for r in back)
    for original, copy in zip(records, back):
        assert copy.key is None if original.key is None else type(copy.key) is bytes
        assert type(copy.value) is bytes
        assert all(type(h) is tuple and type(h[0]) is str for h in copy.headers)


def test_round_trip_none_value():
    records = [Record(5, 10, b"k", None, [])]
    assert unpack(pack(records)) == records


def test_round_trip_empty_batch():
    assert unpack(pack([])) == []


def test_round_trip_random():
    rng = random.Random(7)
    records = [
        Record(i, rng.randrange(0, 2 ** 41), rng.choice([None, rng.randbytes(rng.randrange(0, 20))]),
               rng.randbytes(rng.randrange(0, 2000)),
               [(f"h{j}", rng.randbytes(rng.randrange(0, 10))) for j in range(rng.randrange(0, 3))])
        for i in range(500)
    ]
    assert unpack(pack(records)) == records


def test_bytes_and_str_are_kept_apart():
    # A str key must not come back as bytes nor the reverse (use_bin_type / raw=False).
    back = unpack(pack([Record(0, 0, b"abc", b"abc", [("abc", b"abc")])]))[0]
    assert back.key == b"abc" and back.value == b"abc" and back.headers == [("abc", b"abc")]


def test_batch_id_format():
    assert batch_id("logs", 3, 100, 199) == "logs:3:100-199"


@pytest.mark.parametrize("topic", ["logs", "app.logs-v2", "my_topic.with.dots", "a-b-c", "x" * 249])
@pytest.mark.parametrize("partition, first, last", [(0, 0, 0), (17, 123, 456), (2 ** 31 - 1, 2 ** 62, 2 ** 63 - 1)])
def test_batch_id_round_trip(topic, partition, first, last):
    assert parse_batch_id(batch_id(topic, partition, first, last)) == (topic, partition, first, last)


def test_batch_id_is_deterministic_and_distinct():
    assert batch_id("t", 1, 2, 3) == batch_id("t", 1, 2, 3)
    ids = {batch_id("t", p, f, l) for p in range(3) for f in range(3) for l in range(3, 6)}
    assert len(ids) == 27


def test_a_recreated_topic_s_batches_carry_its_incarnation():
    assert batch_id("logs", 2, 0, 9) == "logs:2:0-9"
    assert batch_id("logs", 2, 0, 9, incarnation=3) == "logs:2:0-9@3"
    assert parse_batch_id("logs:2:0-9@3") == ("logs", 2, 0, 9)
