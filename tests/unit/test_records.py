"""Unit tests for sluice.formats.records: routing, validation, quarantine and hour bucketing."""

from __future__ import annotations

import base64
import random
import zlib
from collections import Counter
from datetime import datetime, timezone

import orjson
import pytest

from sluice.core.errors import SluiceError
from sluice.formats.records import (
    QUARANTINE_APP,
    Record,
    Rejected,
    Router,
    hour_of,
    parse_timestamp,
    quarantine_line,
    valid_app_id,
)

# 2023-11-14T22:13:20Z
TS = 1_700_000_000
TS_HOUR = "2023111422"
# 2020-09-13T12:26:40Z: a Kafka timestamp in a different hour than TS, to tell the two apart.
KAFKA_MS = 1_600_000_000_000
KAFKA_HOUR = "2020091312"


def rec(value, key=None, headers=None, offset=0, timestamp_ms=KAFKA_MS) -> Record:
    return Record(offset, timestamp_ms, key, value, list(headers or []))


def doc(**fields) -> bytes:
    return orjson.dumps(fields)


def reason(router: Router, record: Record) -> str:
    with pytest.raises(Rejected) as info:
        router.route(record)
    return str(info.value)


def test_a_rejection_is_a_sluice_error():
    with pytest.raises(SluiceError, match="missing_app_id"):
        Router("json:app").route(rec(doc(msg="no app")))


# --------------------------------------------------------------------------- app id sources


class TestJsonSource:
    def test_reads_app_from_field(self):
        value = doc(app="billing", ts=TS, msg="hi")
        assert Router("json:app").route(rec(value)) == ("billing", TS_HOUR, value)

    def test_other_field_name(self):
        value = doc(service="orders", app="ignored")
        app, _, _ = Router("json:service").route(rec(value))
        assert app == "orders"

    def test_missing_field(self):
        assert reason(Router("json:app"), rec(doc(other="x"))) == "missing_app_id"

    def test_null_field_is_missing(self):
        assert reason(Router("json:app"), rec(b'{"app": null}')) == "missing_app_id"

    def test_json_not_an_object_is_missing(self):
        assert reason(Router("json:app"), rec(b'["app", "billing"]')) == "missing_app_id"
        assert reason(Router("json:app"), rec(b'"billing"')) == "missing_app_id"

    @pytest.mark.parametrize("raw", [b"123", b"1.5", b'["a"]', b'{"x": 1}', b"true", b"false"])
    def test_non_string_app_is_bad(self, raw):
        assert reason(Router("json:app"), rec(b'{"app": ' + raw + b"}")) == "bad_app_id"

    def test_non_json_is_undecodable(self):
        assert reason(Router("json:app"), rec(b"plain text app=billing")) == "undecodable"
        assert reason(Router("json:app"), rec(b'{"app": "a"')) == "undecodable"

    def test_empty_bytes_is_undecodable(self):
        assert reason(Router("json:app"), rec(b"")) == "undecodable"

    def test_key_and_headers_ignored(self):
        r = rec(doc(app="fromjson"), key=b"fromkey", headers=[("x-app", b"fromheader")])
        assert Router("json:app").route(r)[0] == "fromjson"


class TestKeySource:
    def test_reads_key(self):
        value = b"2024-01-01 INFO plain text line"
        assert Router("key").route(rec(value, key=b"billing")) == ("billing", KAFKA_HOUR, value)

    def test_missing_key(self):
        assert reason(Router("key"), rec(b"line", key=None)) == "missing_app_id"

    def test_invalid_utf8_value_is_undecodable(self):
        assert reason(Router("key"), rec(b"abc\xff\xfe", key=b"billing")) == "undecodable"

    def test_invalid_utf8_value_starting_like_json_is_undecodable(self):
        assert reason(Router("key"), rec(b"{\xff\xfe", key=b"billing")) == "undecodable"

    def test_utf8_value_that_is_not_json_is_accepted(self):
        value = "{not json, but text: é".encode()
        assert Router("key").route(rec(value, key=b"billing")) == ("billing", KAFKA_HOUR, value)

    def test_json_value_still_gives_event_time(self):
        value = doc(ts=TS, msg="x")
        assert Router("key").route(rec(value, key=b"billing"))[1] == TS_HOUR

    @pytest.mark.parametrize("key", [b"\xff\xfe", "caf\u00e9".encode(), b"../x", b"a/b", b"", b"_x"])
    def test_bad_key(self, key):
        assert reason(Router("key"), rec(b"line", key=key)) == "bad_app_id"


class TestHeaderSource:
    def test_reads_named_header(self):
        r = rec(doc(app="fromjson"), headers=[("trace", b"zzz"), ("x-app", b"billing")])
        assert Router("header:x-app").route(r)[0] == "billing"

    def test_missing_header(self):
        r = rec(b"line", headers=[("trace", b"billing")])
        assert reason(Router("header:x-app"), r) == "missing_app_id"

    def test_header_name_is_exact(self):
        r = rec(b"line", headers=[("X-App", b"billing")])
        assert reason(Router("header:x-app"), r) == "missing_app_id"

    def test_null_header_value(self):
        r = rec(b"line", headers=[("x-app", None)])
        assert reason(Router("header:x-app"), r) == "missing_app_id"

    def test_bad_header_value(self):
        r = rec(b"line", headers=[("x-app", b"../../etc")])
        assert reason(Router("header:x-app"), r) == "bad_app_id"

    def test_non_ascii_header_value(self):
        r = rec(b"line", headers=[("x-app", b"\xe4\xbd\xa0\xe5\xa5\xbd")])
        assert reason(Router("header:x-app"), r) == "bad_app_id"


class TestRegexSource:
    def test_numbered_group(self):
        router = Router(r"regex:app=(\S+)")
        value = b"2024-01-01T00:00:00Z INFO app=billing charged"
        assert router.route(rec(value)) == ("billing", KAFKA_HOUR, value)

    def test_named_group_wins_over_group_one(self):
        router = Router(r"regex:^(\w+) \[(?P<app>[^\]]+)\]")
        assert router.route(rec(b"INFO [orders] created"))[0] == "orders"

    def test_first_group_used_without_app_name(self):
        router = Router(r"regex:^(\w+) \[(?P<svc>[^\]]+)\]")
        assert router.route(rec(b"INFO [orders] created"))[0] == "INFO"

    def test_no_match_is_missing(self):
        assert reason(Router(r"regex:app=(\S+)"), rec(b"no id here")) == "missing_app_id"

    def test_optional_group_not_participating_is_missing(self):
        router = Router(r"regex:^x(?:app=(\w+))?")
        assert reason(router, rec(b"x only")) == "missing_app_id"

    def test_bad_captured_id(self):
        assert reason(Router(r"regex:app=(\S+)"), rec(b"app=../../etc x")) == "bad_app_id"

    def test_invalid_utf8_is_undecodable(self):
        assert reason(Router(r"regex:app=(\S+)"), rec(b"app=billing \xff")) == "undecodable"

    def test_pattern_without_group_is_refused(self):
        with pytest.raises(ValueError, match="capturing group"):
            Router(r"regex:app=\S+")

    def test_json_value_still_gives_event_time(self):
        router = Router(r'regex:"svc":"(\w+)"')
        assert router.route(rec(doc(svc="billing", ts=TS)))[:2] == ("billing", TS_HOUR)


def test_unknown_source_kind_is_refused():
    with pytest.raises(ValueError, match="unknown app_id_source"):
        Router("yaml:app")


# --------------------------------------------------------------------------- app id validation


VALID_IDS = ["a", "A", "0", "a" * 64, "Z" + "9" * 63, "my.app", "my-app", "my_app",
             "a.b-c_d.E-9", "0.-_", "a..b"]
INVALID_IDS = ["", "a" * 65, "../x", "..", ".x", "-x", "_x", "_quarantine", "a/b", "a\\b",
               "a b", "a\n", "\na", "a\x00", "caf\u00e9", "\u0430pp", "\uff41", "\u0661",
               "a:b", "a*", "a=b"]


@pytest.mark.parametrize("app", VALID_IDS)
def test_valid_app_ids(app):
    assert valid_app_id(app)
    assert Router("json:app").route(rec(doc(app=app)))[0] == app


@pytest.mark.parametrize("app", INVALID_IDS)
def test_invalid_app_ids(app):
    assert not valid_app_id(app)
    assert reason(Router("json:app"), rec(doc(app=app))) == "bad_app_id"


# --------------------------------------------------------------------------- quarantine reasons


def test_none_value_is_empty():
    assert reason(Router("json:app"), rec(None)) == "empty"
    assert reason(Router("key"), rec(None, key=b"billing")) == "empty"


def test_oversized_boundary():
    router = Router("key", record_max_bytes=10)
    assert router.route(rec(b"x" * 10, key=b"a"))[2] == b"x" * 10
    assert reason(router, rec(b"x" * 11, key=b"a")) == "oversized"


def test_oversized_checked_before_other_reasons():
    router = Router("json:app", record_max_bytes=8)
    assert reason(router, rec(b"\xff\n\xff\n\xff\n\xff\n\xff")) == "oversized"


def test_single_trailing_newline_is_stripped():
    value = doc(app="billing", ts=TS)
    assert Router("json:app").route(rec(value + b"\n")) == ("billing", TS_HOUR, value)
    assert Router("key").route(rec(b"text\n", key=b"a"))[2] == b"text"


@pytest.mark.parametrize("value", [
    b'{"app": "a",\n "ts": 1}',
    b'{"app": "a"}\n\n',
    b'{"app": "a"}\nsecond line\n',
    b"\n" + b'{"app": "a"}',
])
def test_inner_newline_is_multiline(value):
    assert reason(Router("json:app"), rec(value)) == "multiline"


def test_multiline_under_key_source():
    assert reason(Router("key"), rec(b"one\ntwo", key=b"a")) == "multiline"


def test_carriage_return_is_not_a_line_break():
    assert Router("key").route(rec(b"one\rtwo", key=b"a"))[2] == b"one\rtwo"


@pytest.mark.parametrize("record, expected", [
    (rec(None), "empty"),
    (rec(b"x" * 100), "oversized"),
    (rec(b'{"app":"a"}\n{"app":"b"}'), "multiline"),
    (rec(b"not json"), "undecodable"),
    (rec(doc(msg="no app")), "missing_app_id"),
    (rec(doc(app="a/b")), "bad_app_id"),
])
def test_group_quarantines_with_reason(record, expected):
    router = Router("json:app", record_max_bytes=50)
    groups = router.group([record], "logs", 3)
    assert list(groups) == [(QUARANTINE_APP, KAFKA_HOUR)]
    [line] = groups[(QUARANTINE_APP, KAFKA_HOUR)]
    assert orjson.loads(line)["reason"] == expected


def test_quarantine_uses_kafka_time_even_when_ts_present():
    r = rec(doc(app="../x", ts=TS))
    groups = Router("json:app").group([r], "logs", 0)
    assert list(groups) == [(QUARANTINE_APP, KAFKA_HOUR)]


def test_quarantine_envelope_fields():
    r = Record(42, KAFKA_MS, b"k\x00", b"v\xff\n\nx", [("h1", b"\x01"), ("h2", b"")])
    line = quarantine_line(r, "multiline", "my.topic", 7)
    assert b"\n" not in line
    env = orjson.loads(line)
    assert env == {
        "reason": "multiline",
        "topic": "my.topic",
        "partition": 7,
        "offset": 42,
        "timestamp_ms": KAFKA_MS,
        "key_b64": base64.b64encode(b"k\x00").decode(),
        "value_b64": base64.b64encode(b"v\xff\n\nx").decode(),
        "headers": [["h1", base64.b64encode(b"\x01").decode()], ["h2", ""]],
    }


def test_quarantine_envelope_none_key_and_value():
    env = orjson.loads(quarantine_line(rec(None, key=None), "empty", "t", 0))
    assert env["key_b64"] is None
    assert env["value_b64"] == ""


def _recover(line: bytes) -> tuple[bytes | None, bytes, list[tuple[str, bytes]]]:
    env = orjson.loads(line)
    key = None if env["key_b64"] is None else base64.b64decode(env["key_b64"], validate=True)
    value = base64.b64decode(env["value_b64"], validate=True)
    headers = [(name, base64.b64decode(v, validate=True)) for name, v in env["headers"]]
    return key, value, headers


def test_quarantine_round_trip_random_bytes():
    rng = random.Random(1234)
    router = Router("json:app", record_max_bytes=4096)
    records = []
    for offset in range(300):
        # A leading 0xff byte is never valid JSON, so every record is quarantined.
        value = b"\xff" + rng.randbytes(rng.randrange(0, 6000))
        key = None if rng.random() < 0.3 else rng.randbytes(rng.randrange(0, 40))
        headers = [(f"h{i}-\u00e9", rng.randbytes(rng.randrange(0, 30)))
                   for i in range(rng.randrange(0, 4))]
        records.append(Record(offset, KAFKA_MS + offset, key, value, headers))
    groups = router.group(records, "logs", 0)
    assert set(groups) == {(QUARANTINE_APP, KAFKA_HOUR)}
    lines = groups[(QUARANTINE_APP, KAFKA_HOUR)]
    assert len(lines) == len(records)
    for record, line in zip(records, lines):
        assert b"\n" not in line
        assert orjson.loads(line)["offset"] == record.offset
        assert _recover(line) == (record.key, record.value, record.headers)


# --------------------------------------------------------------------------- hour bucketing


@pytest.mark.parametrize("ts", [
    TS,
    TS + 0.5,
    TS * 1000,
    TS * 1000 + 999,
    "2023-11-14T22:13:20Z",
    "2023-11-14T22:59:59.999Z",
    "2023-11-15T00:13:20+02:00",
    "2023-11-14T17:13:20-05:00",
    "2023-11-14T22:13:20",
    "2023-11-14T22:13:20.123456",
    str(TS),
    f"{TS}.25",
    str(TS * 1000),
])
def test_hour_from_ts(ts, non_utc_local_time):
    value = orjson.dumps({"app": "a", "ts": ts})
    assert Router("json:app").route(rec(value))[1] == TS_HOUR


@pytest.mark.parametrize("ts", [
    None, True, False, "", "yesterday", "2023-13-45T00:00:00Z", [TS], {"s": TS},
    -1, -TS, "-5", 253402300800 * 1000, 1e30, "1e400", "nan", "inf",
])
def test_hour_falls_back_to_kafka_time(ts):
    value = orjson.dumps({"app": "a", "ts": ts})
    assert Router("json:app").route(rec(value))[1] == KAFKA_HOUR


def test_hour_falls_back_when_ts_missing():
    assert Router("json:app").route(rec(doc(app="a")))[1] == KAFKA_HOUR


def test_other_timestamp_field():
    value = doc(app="a", ts=1, time=TS)
    assert Router("json:app", timestamp_field="time").route(rec(value))[1] == TS_HOUR


def test_empty_timestamp_field_always_uses_kafka_time():
    value = doc(app="a", ts=TS)
    assert Router("json:app", timestamp_field="").route(rec(value))[1] == KAFKA_HOUR
    assert Router("key", timestamp_field="").route(rec(value, key=b"a"))[1] == KAFKA_HOUR


def test_hour_boundaries():
    base = int(datetime(2024, 2, 29, 23, tzinfo=timezone.utc).timestamp())
    router = Router("json:app")
    assert router.route(rec(doc(app="a", ts=base)))[1] == "2024022923"
    assert router.route(rec(doc(app="a", ts=base + 3599.999)))[1] == "2024022923"
    assert router.route(rec(doc(app="a", ts=base + 3600)))[1] == "2024030100"


def test_hour_of():
    assert hour_of(0) == "1970010100"
    assert hour_of(TS) == TS_HOUR
    assert hour_of(253402300799) == "9999123123"


class TestParseTimestamp:
    @pytest.mark.parametrize("value, expected", [
        (TS, float(TS)),
        (0, 0.0),
        (1.5, 1.5),
        (1e11, 1e11),  # at the threshold: still seconds
        (100_000_000_001, 100_000_000.001),  # above it: milliseconds
        (253402300799999, 253402300799.999),
        (TS * 1000, float(TS)),
        (str(TS), float(TS)),
        (" 1700000000 ", float(TS)),
        (str(TS * 1000), float(TS)),
        ("2023-11-14T22:13:20Z", float(TS)),
        ("2023-11-14T22:13:20+00:00", float(TS)),
        ("2023-11-15T07:43:20+09:30", float(TS)),
        ("2023-11-14T22:13:20", float(TS)),
        ("2023-11-14", float(TS - (22 * 3600 + 13 * 60 + 20))),
        ("1970-01-01T00:00:00Z", 0.0),
        ("9999-12-31T23:59:59Z", 253402300799.0),
    ])
    def test_usable(self, value, expected, non_utc_local_time):
        assert parse_timestamp(value) == pytest.approx(expected, abs=1e-6)

    @pytest.mark.parametrize("value", [
        None, True, False, b"1700000000", [TS], {"ts": TS}, "", "now", "garbage",
        "2023-02-30T00:00:00Z", -1, -0.5, "-1", "1969-12-31T23:59:59Z",
        253402300800 * 1000, "253402300800000", 1e30, float("nan"), float("inf"), "nan", "inf",
        "1e400", "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00",
    ])
    def test_unusable(self, value):
        assert parse_timestamp(value) is None

    def test_huge_int_is_unusable(self):
        assert parse_timestamp(10 ** 400) is None


# --------------------------------------------------------------------------- group()


def test_group_keys_and_order():
    router = Router("json:app")
    h10 = int(datetime(2024, 3, 1, 10, 5, tzinfo=timezone.utc).timestamp())
    h11 = h10 + 3600
    values = [
        doc(app="a", ts=h10, n=0),
        doc(app="b", ts=h10, n=1),
        doc(app="a", ts=h11, n=2),
        doc(app="a", ts=h10, n=3),
        b"junk",
    ]
    groups = router.group([rec(v, offset=i) for i, v in enumerate(values)], "logs", 0)
    assert groups == {
        ("a", "2024030110"): [values[0], values[3]],
        ("b", "2024030110"): [values[1]],
        ("a", "2024030111"): [values[2]],
        (QUARANTINE_APP, KAFKA_HOUR): [groups[(QUARANTINE_APP, KAFKA_HOUR)][0]],
    }
    assert orjson.loads(groups[(QUARANTINE_APP, KAFKA_HOUR)][0])["offset"] == 4


def test_group_empty():
    assert Router().group([], "logs", 0) == {}


def _random_record(rng: random.Random, offset: int, source: str) -> Record:
    ts_ms = rng.randrange(0, 253402300800 * 1000)
    apps = ["billing", "orders", "a" * 64, "x.y-z_1", "a" * 65, "../x", "", "_q", "\u00e9"]
    app = rng.choice(apps)
    kind = rng.randrange(9)
    fields = {"seq": offset, "msg": "m" * rng.randrange(0, 50)}
    if kind != 0:
        fields["app"] = app
    if kind != 1:
        fields["ts"] = rng.choice([
            rng.randrange(0, 253402300800),
            rng.randrange(0, 253402300800) * 1000,
            datetime.fromtimestamp(rng.randrange(0, 4102444800), timezone.utc).isoformat(),
            "garbage", True, None, -5, 1e300,
        ])
    value: bytes | None = orjson.dumps(fields)
    if kind == 2:
        value = None
    elif kind == 3:
        # Invalid UTF-8 and never JSON: undecodable under every source.
        value = b"\xff" + rng.randbytes(rng.randrange(0, 200))
    elif kind == 4:
        value = value + b"\n" + value
    elif kind == 5:
        value = value + b"\n"
    elif kind == 6:
        value = value + b" " * 300  # oversized at record_max_bytes=300
    key = app.encode() if rng.random() < 0.8 else rng.choice([None, rng.randbytes(5)])
    headers = [("x-app", app.encode())] if rng.random() < 0.8 else []
    return Record(offset, ts_ms, key, value, headers)


@pytest.mark.parametrize("source", ["json:app", "key", "header:x-app", r'regex:"app":"([^"]*)"',
                                    r'regex:"app":"(?P<app>[^"]*)"'])
def test_group_every_record_exactly_once(source):
    rng = random.Random(zlib.crc32(source.encode()))
    router = Router(source, record_max_bytes=300)
    records = [_random_record(rng, offset, source) for offset in range(1500)]
    groups = router.group(records, "logs", 0)
    assert sum(len(lines) for lines in groups.values()) == len(records)

    seen: Counter[int] = Counter()
    by_offset = {r.offset: r for r in records}
    for (app, hour), lines in groups.items():
        assert len(hour) == 10 and hour.isdigit()
        assert app == QUARANTINE_APP or valid_app_id(app)
        for line in lines:
            assert b"\n" not in line
            if app == QUARANTINE_APP:
                offset = orjson.loads(line)["offset"]
                original = by_offset[offset]
                assert _recover(line) == (original.key, original.value or b"", original.headers)
                assert hour == hour_of(original.timestamp_ms / 1000)
            else:
                offset = orjson.loads(line)["seq"]
                original = by_offset[offset]
                assert line == original.value.removesuffix(b"\n")
            seen[offset] += 1
    assert seen == Counter(range(len(records)))
    # The generator must actually exercise both outcomes.
    assert (QUARANTINE_APP in {app for app, _ in groups}) and len(groups) > 1


@pytest.mark.parametrize("timestamp_ms", [10 ** 15, -(10 ** 15)])
@pytest.mark.parametrize("value", [doc(app="billing"), b"junk"])
def test_group_survives_out_of_range_kafka_timestamp(timestamp_ms, value):
    records = [rec(value, timestamp_ms=timestamp_ms), rec(doc(app="billing", ts=TS), offset=1)]
    groups = Router("json:app").group(records, "logs", 0)
    assert sum(len(lines) for lines in groups.values()) == 2


@pytest.mark.parametrize("hour", ["1970010100", "2026112409", "2024022923", "9999123123"])
def test_hour_start_is_the_inverse_of_hour_of(hour):
    from sluice.formats.records import hour_start

    start = hour_start(hour)
    assert hour_of(start) == hour and hour_of(start + 3599.9) == hour and hour_of(start - 0.1) != hour


def test_every_quarantine_reason_is_one_the_metrics_serve_from_the_start():
    """sluice_records_quarantined_total serves each of QUARANTINE_REASONS at 0 until it happens;
    a reason raised but not listed would appear only at its first quarantine, which an alert on
    its increase would miss."""
    import re
    from pathlib import Path

    from sluice.formats.records import QUARANTINE_REASONS

    root = Path(__file__).resolve().parents[2] / "sluice"
    raised = set(re.findall(r'Rejected\("([a-z_]+)"\)', (root / "formats" / "records.py").read_text()))
    flaws = set(re.findall(r'\[\], "([a-z_]+)"\)|\],\s+"([a-z_]+)"\)',
                           (root / "handover" / "undecodable.py").read_text()))
    flaws = {name for pair in flaws for name in pair if name}
    assert raised and flaws, "the patterns still find the reasons"
    assert raised | flaws <= set(QUARANTINE_REASONS), (raised | flaws) - set(QUARANTINE_REASONS)
