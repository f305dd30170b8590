"""Unit tests for sluice.query.fetch: time parsing, hour enumeration, zstd line reading, fetch()."""

from __future__ import annotations

import io
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
import zstandard

import sluice.query.external_sort as external_sort
from sluice.archive.store import FileStore, object_key
from sluice.formats.frames import Damaged, Meta, announce, read_frames
from sluice.formats.records import QUARANTINE_APP, Record, Router
from sluice.query.fetch import Fetch, Query, fetch
from sluice.query.timewindow import hours_between, parse_when

UTC = timezone.utc
NOW = datetime(2024, 3, 1, 12, 0, 0, tzinfo=UTC)


# --------------------------------------------------------------------------- parse_when


class TestParseWhen:
    def test_now(self):
        assert parse_when("now", now=NOW) == NOW
        assert parse_when("  now \n", now=NOW) == NOW

    def test_now_defaults_to_current_utc_time(self):
        before = datetime.now(UTC)
        got = parse_when("now")
        after = datetime.now(UTC)
        assert got.tzinfo is not None
        assert before <= got <= after

    @pytest.mark.parametrize("text, delta", [
        ("-15m", timedelta(minutes=15)),
        ("15m", timedelta(minutes=15)),
        ("2h", timedelta(hours=2)),
        ("-2h", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("-30s", timedelta(seconds=30)),
        ("0m", timedelta(0)),
        ("90m", timedelta(minutes=90)),
    ])
    def test_relative_is_in_the_past(self, text, delta):
        assert parse_when(text, now=NOW) == NOW - delta

    @pytest.mark.parametrize("text, expected", [
        ("2024-03-01T10:30:00Z", datetime(2024, 3, 1, 10, 30, tzinfo=UTC)),
        ("2024-03-01T10:30:00+02:00", datetime(2024, 3, 1, 8, 30, tzinfo=UTC)),
        ("2024-03-01T10:30:00", datetime(2024, 3, 1, 10, 30, tzinfo=UTC)),
        ("2024-03-01", datetime(2024, 3, 1, tzinfo=UTC)),
        ("1700000000", datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        ("1700000000.5", datetime(2023, 11, 14, 22, 13, 20, 500000, tzinfo=UTC)),
    ])
    def test_absolute(self, text, expected, non_utc_local_time):
        got = parse_when(text, now=NOW)
        assert got == expected
        assert got.utcoffset() == timedelta(0)

    @pytest.mark.parametrize("text", ["", "garbage", "tomorrow", "1w", "-2x", "2 h", "h",
                                      "--2h", "2024-13-01T00:00:00Z", "NOW", "-1"])
    def test_garbage_raises_clear_value_error(self, text):
        with pytest.raises(ValueError, match=r"cannot read .* as a time: use ISO 8601, epoch seconds"):
            parse_when(text, now=NOW)

    def test_error_names_the_input(self):
        with pytest.raises(ValueError, match="'yesterday-ish'"):
            parse_when("yesterday-ish", now=NOW)

    @pytest.mark.parametrize("text", ["-9999999999d", "-999999999d"])
    def test_huge_relative_offset_raises_value_error(self, text):
        with pytest.raises(ValueError):
            parse_when(text, now=NOW)


# --------------------------------------------------------------------------- hours_between


def t(day, hour, minute=0, second=0, micro=0):
    return datetime(2024, 3, day, hour, minute, second, micro, tzinfo=UTC)


class TestHoursBetween:
    def test_partial_hours_at_both_ends(self):
        assert hours_between(t(1, 10, 30), t(1, 12, 15)) == ["2024030110", "2024030111", "2024030112"]

    def test_aligned_end_is_exclusive(self):
        assert hours_between(t(1, 10, 30), t(1, 12)) == ["2024030110", "2024030111"]

    def test_one_microsecond_past_the_hour(self):
        assert hours_between(t(1, 10), t(1, 12, micro=1)) == ["2024030110", "2024030111", "2024030112"]

    def test_within_one_hour(self):
        assert hours_between(t(1, 10, 5), t(1, 10, 6)) == ["2024030110"]

    def test_exact_hour(self):
        assert hours_between(t(1, 10), t(1, 11)) == ["2024030110"]

    def test_day_boundary(self):
        assert hours_between(t(1, 22, 59), t(2, 1, 1)) == \
            ["2024030122", "2024030123", "2024030200", "2024030201"]

    def test_month_and_leap_day(self):
        since = datetime(2024, 2, 28, 23, 30, tzinfo=UTC)
        until = datetime(2024, 3, 1, 0, 30, tzinfo=UTC)
        hours = hours_between(since, until)
        assert len(hours) == 26
        assert hours[0] == "2024022823" and hours[1] == "2024022900" and hours[-1] == "2024030100"

    def test_non_utc_inputs_are_converted(self):
        plus2 = timezone(timedelta(hours=2))
        since = datetime(2024, 3, 1, 0, 30, tzinfo=plus2)   # 2024-02-29 22:30 UTC
        until = datetime(2024, 3, 1, 2, 0, tzinfo=plus2)    # 2024-03-01 00:00 UTC
        assert hours_between(since, until) == ["2024022922", "2024022923"]

    def test_half_hour_zone(self):
        india = timezone(timedelta(hours=5, minutes=30))
        since = datetime(2024, 3, 1, 16, 0, tzinfo=india)   # 10:30 UTC
        until = datetime(2024, 3, 1, 17, 0, tzinfo=india)   # 11:30 UTC
        assert hours_between(since, until) == ["2024030110", "2024030111"]

    @pytest.mark.parametrize("since, until", [
        (t(1, 10), t(1, 10)),
        (t(1, 12), t(1, 10)),
        (t(2, 0), t(1, 23, 59)),
    ])
    def test_empty_when_until_not_after_since_aligned(self, since, until):
        assert hours_between(since, until) == []

    @pytest.mark.parametrize("since, until", [
        (t(1, 10, 30), t(1, 10, 30)),
        (t(1, 10, 30), t(1, 10, 15)),
    ])
    def test_empty_when_until_not_after_since_unaligned(self, since, until):
        assert hours_between(since, until) == []


# --------------------------------------------------------------------------- read_frames, plain zstd


def iter_lines(stream) -> list[bytes]:
    """The lines read_frames gives of a stream of frames sluice did not announce."""
    return [line for block in read_frames(stream) for line in block.data.split(b"\n")[:-1]]


def frames(*chunks: bytes) -> bytes:
    c = zstandard.ZstdCompressor()
    return b"".join(c.compress(chunk) for chunk in chunks)


class TestIterLines:
    def test_multi_frame_stream(self):
        data = frames(b"a1\na2\n", b"b1\n", b"c1\nc2\nc3\n")
        assert list(iter_lines(io.BytesIO(data))) == [b"a1", b"a2", b"b1", b"c1", b"c2", b"c3"]

    def test_many_small_frames(self):
        lines = [f"line-{i}".encode() for i in range(2000)]
        data = frames(*(line + b"\n" for line in lines))
        assert list(iter_lines(io.BytesIO(data))) == lines

    def test_frame_written_by_stream_writer(self):
        # A frame without a content size in its header, as a streaming writer produces.
        buf = io.BytesIO()
        with zstandard.ZstdCompressor().stream_writer(buf, closefd=False) as writer:
            writer.write(b"s1\ns2\n")
        data = frames(b"x\n") + buf.getvalue() + frames(b"y\n")
        assert list(iter_lines(io.BytesIO(data))) == [b"x", b"s1", b"s2", b"y"]

    def test_empty_frame_in_the_middle(self):
        data = frames(b"a\n", b"", b"b\n", b"", b"c\n")
        assert list(iter_lines(io.BytesIO(data))) == [b"a", b"b", b"c"]

    def test_empty_stream(self):
        assert list(iter_lines(io.BytesIO(b""))) == []

    def test_no_trailing_newline_yields_rest(self):
        assert list(iter_lines(io.BytesIO(frames(b"a\nb")))) == [b"a", b"b"]

    def test_empty_lines_kept(self):
        assert list(iter_lines(io.BytesIO(frames(b"a\n\nb\n")))) == [b"a", b"", b"b"]

    def test_large_frame_splits_lines_across_read_chunks(self):
        # Lines of varying lengths in frames > 1 MiB, so 1 MiB reads end mid-line.
        lines = [(b"%07d:" % i) + b"x" * (i * 37 % 3001) for i in range(3000)]
        half = len(lines) // 2
        first = b"".join(line + b"\n" for line in lines[:half])
        second = b"".join(line + b"\n" for line in lines[half:])
        assert len(first) > 1024 * 1024 and len(second) > 1024 * 1024
        data = frames(first, b"small\n", second)
        got = list(iter_lines(io.BytesIO(data)))
        assert got == lines[:half] + [b"small"] + lines[half:]

    def test_one_line_longer_than_a_read_chunk(self):
        big = b"y" * (3 * 1024 * 1024 + 17)
        data = frames(b"before\n", big + b"\n", b"after\n")
        assert list(iter_lines(io.BytesIO(data))) == [b"before", big, b"after"]

    def test_not_zstd_raises(self):
        with pytest.raises(Damaged):
            list(iter_lines(io.BytesIO(b"this is not zstd at all" * 10)))


# --------------------------------------------------------------------------- fetch()


def ts(hour: int, minute: int) -> int:
    return int(t(1, hour, minute).timestamp())


def line(app: str, hour: int, minute: int, msg: str = "ok", **extra) -> bytes:
    return orjson.dumps({"app": app, "ts": ts(hour, minute), "msg": msg, **extra})


def put(store: FileStore, tmp_path: Path, app: str, hour: str, fid: str, data: bytes) -> None:
    local = tmp_path / "upload.tmp"
    local.write_bytes(data)
    store.put(local, object_key(app, hour, fid))


@pytest.fixture
def archive(tmp_path):
    """apps alpha, alpha2 and beta over hours 10, 11, 12 of 2024-03-01; two objects per hour."""
    store = FileStore(tmp_path / "store")
    expected: dict[str, dict[int, list[bytes]]] = {}
    for app in ("alpha", "alpha2", "beta"):
        expected[app] = {}
        for hour in (10, 11, 12):
            first = [line(app, hour, 15, "ERROR boom"), line(app, hour, 45)]
            second = [f"plain text {app} {hour} no ts".encode(),
                      orjson.dumps({"app": app, "msg": "ERROR json without ts"}),
                      orjson.dumps({"app": app, "ts": "garbage", "msg": "bad ts"})]
            put(store, tmp_path, app, f"20240301{hour:02d}", "f1", frames(*(x + b"\n" for x in first)))
            put(store, tmp_path, app, f"20240301{hour:02d}", "f2", frames(b"\n".join(second) + b"\n"))
            expected[app][hour] = first + second
    return store, expected


def run(store, app, since, until, **kwargs) -> tuple[int, list[bytes]]:
    out = io.BytesIO()
    count = fetch(store, app, since, until, out, **kwargs)
    data = out.getvalue()
    assert data == b"" or data.endswith(b"\n")
    lines = data.split(b"\n")[:-1] if data else []
    assert count == len(lines)
    return count, lines


def untimed(app, hour):
    return [f"plain text {app} {hour} no ts".encode(),
            orjson.dumps({"app": app, "msg": "ERROR json without ts"}),
            orjson.dumps({"app": app, "ts": "garbage", "msg": "bad ts"})]


class TestFetch:
    def test_window_returns_only_that_app_and_time(self, archive):
        store, _ = archive
        count, lines = run(store, "alpha", t(1, 10, 30), t(1, 12, 30))
        assert lines == (
            [line("alpha", 10, 45)] + untimed("alpha", 10)
            + [line("alpha", 11, 15, "ERROR boom"), line("alpha", 11, 45)] + untimed("alpha", 11)
            + [line("alpha", 12, 15, "ERROR boom")] + untimed("alpha", 12)
        )
        assert count == 13

    def test_since_inclusive_until_exclusive(self, archive):
        store, _ = archive
        _, lines = run(store, "alpha", t(1, 10, 15), t(1, 10, 45))
        assert line("alpha", 10, 15, "ERROR boom") in lines
        assert line("alpha", 10, 45) not in lines

    def test_whole_range(self, archive):
        store, expected = archive
        _, lines = run(store, "beta", t(1, 0), t(2, 0))
        assert lines == expected["beta"][10] + expected["beta"][11] + expected["beta"][12]

    def test_grep(self, archive):
        store, _ = archive
        _, lines = run(store, "alpha", t(1, 10, 30), t(1, 12, 30), grep=re.compile(rb"ERROR"))
        assert lines == [
            orjson.dumps({"app": "alpha", "msg": "ERROR json without ts"}),
            line("alpha", 11, 15, "ERROR boom"),
            orjson.dumps({"app": "alpha", "msg": "ERROR json without ts"}),
            line("alpha", 12, 15, "ERROR boom"),
            orjson.dumps({"app": "alpha", "msg": "ERROR json without ts"}),
        ]

    def test_grep_no_match(self, archive):
        store, _ = archive
        assert run(store, "alpha", t(1, 10), t(1, 13), grep=re.compile(rb"NOPE")) == (0, [])

    def test_untimed_lines_only_from_overlapping_hours(self, archive):
        store, _ = archive
        _, lines = run(store, "alpha", t(1, 11, 50), t(1, 11, 55))
        assert lines == untimed("alpha", 11)

    def test_empty_timestamp_field_disables_time_filter(self, archive):
        store, expected = archive
        _, lines = run(store, "alpha", t(1, 11, 50), t(1, 11, 55), timestamp_field="")
        assert lines == expected["alpha"][11]

    def test_other_timestamp_field(self, archive):
        store, _ = archive
        # No line has "when", so every line of the overlapping hour is kept.
        _, lines = run(store, "alpha", t(1, 11, 50), t(1, 11, 55), timestamp_field="when")
        assert len(lines) == 5

    def test_no_objects(self, archive):
        store, _ = archive
        assert run(store, "gamma", t(1, 10), t(1, 13)) == (0, [])
        assert run(store, "alpha", t(2, 10), t(2, 13)) == (0, [])

    def test_quarantine_app_allowed(self, tmp_path):
        store = FileStore(tmp_path / "store")
        envelope = orjson.dumps({"reason": "bad_app_id", "offset": 1})
        put(store, tmp_path, QUARANTINE_APP, "2024030110", "q", frames(envelope + b"\n"))
        assert run(store, QUARANTINE_APP, t(1, 10), t(1, 11)) == (1, [envelope])

    @pytest.mark.parametrize("app", ["../x", "a/b", "", "_x", "a" * 65, "app=x", "..", "caf\u00e9"])
    def test_invalid_app_id(self, archive, app):
        store, _ = archive
        with pytest.raises(ValueError, match="not a valid app id"):
            fetch(store, app, t(1, 10), t(1, 13), io.BytesIO())

    @pytest.mark.parametrize("since, until", [(t(1, 10), t(1, 10)), (t(1, 12), t(1, 10))])
    def test_until_must_be_after_since(self, archive, since, until):
        store, _ = archive
        with pytest.raises(ValueError, match="--until must be later than --since"):
            fetch(store, "alpha", since, until, io.BytesIO())

    def test_hours_outside_window_never_opened(self, archive, tmp_path):
        store, _ = archive
        garbage = b"definitely not a zstd frame\n" * 50
        for hour in ("2024030109", "2024030113", "2024030200"):
            put(store, tmp_path, "alpha", hour, "corrupt", garbage)
        # Sanity: a corrupt object is noticed, so the next check means something.
        noticed = Fetch(store, Query("alpha", t(1, 12, 30), t(1, 13, 30)), io.BytesIO())
        noticed.run()
        assert noticed.damaged
        clean = Fetch(store, Query("alpha", t(1, 10), t(1, 13)), io.BytesIO())
        assert clean.run() == 15 and not clean.damaged

    def test_other_apps_objects_never_opened(self, archive, tmp_path):
        store, _ = archive
        put(store, tmp_path, "alpha2", "2024030111", "corrupt", b"not zstd")
        put(store, tmp_path, "beta", "2024030111", "corrupt", b"not zstd")
        assert run(store, "alpha", t(1, 11), t(1, 12))[0] == 5

    def test_writes_to_binary_stream(self, archive, tmp_path):
        store, _ = archive
        with open(tmp_path / "out.jsonl", "wb") as out:
            count = fetch(store, "alpha", t(1, 10), t(1, 11), out)
        assert count == 5
        assert (tmp_path / "out.jsonl").read_bytes().count(b"\n") == 5

    def test_leading_whitespace_json_line_is_time_filtered(self, tmp_path):
        store = FileStore(tmp_path / "store")
        outside = b" " + line("alpha", 10, 5)
        inside = b" " + line("alpha", 10, 40)
        # The router does take the event hour from such a line's ts (Kafka time here is 1970).
        assert Router("json:app").route(Record(0, 0, None, outside, []))[1] == "2024030110"
        put(store, tmp_path, "alpha", "2024030110", "f", frames(outside + b"\n" + inside + b"\n"))
        assert run(store, "alpha", t(1, 10, 30), t(1, 10, 50)) == (1, [inside])


# --------------------------------------------------------------------------- --sort, --limit, --count


@pytest.fixture
def shuffled(tmp_path):
    """One hour of app gamma, its records' times out of order over three objects."""
    import random

    store = FileStore(tmp_path / "store")
    rng = random.Random(5)
    minutes = list(range(60)) * 5
    rng.shuffle(minutes)
    records = [orjson.dumps({"app": "gamma", "ts": ts(10, m) + i % 60, "i": i}) for i, m in enumerate(minutes)]
    cctx = zstandard.ZstdCompressor()
    for n in range(3):
        part = records[n::3]
        data = b"".join(announce(f"b{n}:{k}|gamma|2024030110", cctx.compress(b"\n".join(part[k::4]) + b"\n"),
                                 Meta(len(b"\n".join(part[k::4]) + b"\n"), len(part[k::4]), 0, 2**62))
                        for k in range(4))
        put(store, tmp_path, "gamma", "2024030110", f"f{n}", data)
    return store, records


def event_time(record: bytes) -> int:
    return orjson.loads(record)["ts"]


@pytest.mark.parametrize("buffer", [1 << 30, 2000])  # in memory; spilled to many sorted runs
def test_sort_prints_in_event_time_order(shuffled, monkeypatch, buffer):
    monkeypatch.setattr(external_sort, "SORT_BUFFER_BYTES", buffer)
    store, records = shuffled
    out = io.BytesIO()
    assert Fetch(store, Query("gamma", t(1, 10), t(1, 11), sort=True), out).run() == 300
    lines = out.getvalue().split(b"\n")[:-1]
    assert sorted(lines) == sorted(records)
    assert [event_time(x) for x in lines] == sorted(event_time(x) for x in records)


def test_limit_stops_after_n_and_count_prints_nothing_else(shuffled):
    store, records = shuffled
    out = io.BytesIO()
    assert Fetch(store, Query("gamma", t(1, 10), t(1, 11), limit=7), out).run() == 7
    assert len(out.getvalue().split(b"\n")[:-1]) == 7
    out = io.BytesIO()
    assert Fetch(store, Query("gamma", t(1, 10), t(1, 11), count_only=True), out).run() == 300
    assert out.getvalue() == b""
    out = io.BytesIO()
    sorted_first = Fetch(store, Query("gamma", t(1, 10), t(1, 11), limit=5, sort=True), out)
    assert sorted_first.run() == 5
    assert [event_time(x) for x in out.getvalue().split(b"\n")[:-1]] == sorted(map(event_time, records))[:5]


def test_a_damaged_object_is_named_and_everything_else_printed(shuffled, tmp_path):
    store, records = shuffled
    path = next((tmp_path / "store").rglob("*f1.jsonl.zst"))
    path.write_bytes(path.read_bytes()[:-10])  # truncated
    warnings: list[str] = []
    out = io.BytesIO()
    job = Fetch(store, Query("gamma", t(1, 10), t(1, 11)), out, warn=warnings.append)
    count = job.run()
    assert job.damaged and len(warnings) == 1 and "f1" in warnings[0]
    lines = out.getvalue().split(b"\n")[:-1]
    lost = records[1::3][3::4]  # f1's last frame: its fourth quarter (see `shuffled`)
    assert len(lost) == 25
    assert len(lines) == len(set(lines)) == count, "each printed once, and counted as printed"
    assert set(lines) == set(records) - set(lost), "the last frame of f1 is lost, nothing else"
    assert 300 - 25 <= count < 300  # the last frame of f1 (25 records) is lost, nothing else
    assert set(lines) <= set(records)


def test_sort_cannot_follow():
    with pytest.raises(ValueError, match="--follow"):
        Query("gamma", t(1, 10), None, sort=True).check()
