"""Telling a replay from a recreated topic, given what the broker holds at the mark now."""

from bridge.incarnation import same_incarnation
from sluice.formats.records import Record
from sluice.handover.kafka_probe import fingerprint


def test_the_same_record_at_the_mark_is_a_replay():
    record = Record(99, 1_795_000_000_000, b"k", b"v", [])
    assert same_incarnation(99, fingerprint(record), (99, fingerprint(record)))


def test_another_record_at_the_mark_or_none_at_all_is_a_new_incarnation():
    record = Record(99, 1_795_000_000_000, b"k", b"v", [])
    assert not same_incarnation(99, fingerprint(record), (99, fingerprint(record._replace(value=b"w"))))
    assert not same_incarnation(99, fingerprint(record), (99, fingerprint(record._replace(key=None))))
    assert not same_incarnation(99, fingerprint(record), (99, fingerprint(record._replace(timestamp_ms=1))))
    assert not same_incarnation(99, fingerprint(record), None)


def test_a_mark_whose_record_was_compacted_away_still_holds():
    record = Record(99, 1_795_000_000_000, b"k", b"v", [])
    assert same_incarnation(99, fingerprint(record), (120, "anything"))
