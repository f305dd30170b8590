"""`sluice fetch`: one app's records in a time window, reading only that app's hour prefixes."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from typing import BinaryIO, Iterator

import orjson
import zstandard

from sluice.records import QUARANTINE_APP, looks_like_json_object, parse_timestamp, valid_app_id
from sluice.store import Store, hour_prefix, lineage, live_keys

_RELATIVE = re.compile(r"-?(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (UTC if no zone), epoch seconds, 'now', or a relative '-15m' / '2h' / '1d' ago."""
    now = now or datetime.now(timezone.utc)
    text = text.strip()
    if text == "now":
        return now
    if match := _RELATIVE.fullmatch(text):
        try:
            return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        except OverflowError:
            raise ValueError(f"{text!r} reaches back before year 1") from None
    seconds = parse_timestamp(text)
    if seconds is None:
        raise ValueError(f"cannot read {text!r} as a time: use ISO 8601, epoch seconds, 'now' or '-2h'")
    return datetime.fromtimestamp(seconds, timezone.utc)


def hours_between(since: datetime, until: datetime) -> list[str]:
    """Every YYYYMMDDHH hour that overlaps [since, until)."""
    if until <= since:
        return []
    hour = since.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    hours = []
    while hour < until:
        hours.append(hour.strftime("%Y%m%d%H"))
        hour += timedelta(hours=1)
    return hours


def iter_lines(stream: BinaryIO) -> Iterator[bytes]:
    """Decompressed lines of a multi-frame zstd stream, read incrementally."""
    reader = zstandard.ZstdDecompressor().stream_reader(stream, read_across_frames=True)
    rest = b""
    while chunk := reader.read(1024 * 1024):
        *lines, rest = (rest + chunk).split(b"\n")
        yield from lines
    if rest:
        yield rest


def _event_time(line: bytes, field: str) -> float | None:
    if not field or not looks_like_json_object(line):
        return None
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return parse_timestamp(doc.get(field)) if isinstance(doc, dict) else None


def _open_newest(store: Store, prefix: str, key: str) -> BinaryIO:
    """Open an object, or the generation that replaced it after it was listed (a merge of late
    records), which holds all of it."""
    try:
        return store.open(key)
    except FileNotFoundError:
        base = lineage(key)[0]
        successors = [k for k in live_keys(store.list(prefix)) if lineage(k)[0] == base and k != key]
        if not successors:
            raise
        return store.open(successors[0])


def fetch(store: Store, app: str, since: datetime, until: datetime, out: BinaryIO,
          grep: re.Pattern[bytes] | None = None, timestamp_field: str = "ts") -> int:
    """Write matching lines to `out`; returns how many. Lines with no event time are kept
    when their hour partition overlaps the window."""
    if app != QUARANTINE_APP and not valid_app_id(app):
        raise ValueError(f"{app!r} is not a valid app id")
    if until <= since:
        raise ValueError("--until must be later than --since")
    lo, hi = since.timestamp(), until.timestamp()
    written = 0
    for hour in hours_between(since, until):
        prefix = hour_prefix(app, hour)
        for key in live_keys(store.list(prefix)):
            with _open_newest(store, prefix, key) as stream:
                for line in iter_lines(stream):
                    if grep is not None and not grep.search(line):
                        continue
                    ts = _event_time(line, timestamp_field)
                    if ts is not None and not lo <= ts < hi:
                        continue
                    out.write(line + b"\n")
                    written += 1
    return written
