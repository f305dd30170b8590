"""Pure per-record logic: where a record belongs (app id, event hour) or why it is quarantined.

App ids become path components and object-key parts, so only ids matching `APP_ID_PATTERN`
are accepted; everything else is kept, wrapped in a JSON envelope, under `QUARANTINE_APP`.
"""

from __future__ import annotations

import base64
import calendar
import collections
import re
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any, Callable, Iterable, NamedTuple, Protocol

import orjson

from sluice.core.errors import SluiceError

APP_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Starts with "_", so no valid app id can ever collide with it.
QUARANTINE_APP = "_quarantine"

# Epoch values above this are taken as milliseconds (1e11 seconds is the year 5138).
_MS_THRESHOLD = 1e11
# Hours outside years 1970..9999 cannot be laid out as dt=YYYY-MM-DD.
_MAX_SECONDS = 253402300800


class Record(NamedTuple):
    """One Kafka message as the bridge hands it over.

    A header name is str, or bytes when it is not UTF-8. `flaw` says why the Kafka client could
    not decode the record ("undecodable_header", or "unreadable_record" with the raw record
    bytes as its value); such a record always goes to quarantine.
    """

    offset: int
    timestamp_ms: int
    key: bytes | None
    value: bytes
    headers: list[tuple[str | bytes, bytes | None]]
    flaw: str = ""

    @property
    def timestamp(self) -> int:
        """As Kafka clients name it: the split reads Records and aiokafka's records alike."""
        return self.timestamp_ms


class KafkaRecord(Protocol):
    """What the split reads of a record: a Record, or aiokafka's record as decoded (which has
    no `flaw`: a batch with a flawed record is read into Records instead)."""

    offset: int
    timestamp: int
    key: bytes | None
    value: bytes | None
    headers: list[tuple[str | bytes, bytes | None]]


class Rejected(SluiceError):
    """A record that cannot be archived under an app id; the message is the quarantine reason."""


# Every reason a record is quarantined for (Rejected's messages, and a Record's flaw from
# sluice.handover.undecodable): the metrics serve each from the start, at 0 until it happens, so an
# alert on its increase sees the first quarantine too.
QUARANTINE_REASONS = ("empty", "oversized", "multiline", "undecodable", "missing_app_id", "bad_app_id",
                      "unreadable_record", "undecodable_header")


def hour_of(epoch_seconds: float) -> str:
    """UTC hour bucket as YYYYMMDDHH."""
    return _hour_name(int(epoch_seconds // 3600))


def hour_start(hour: str) -> float:
    """Epoch seconds at the start of a YYYYMMDDHH hour (UTC): the inverse of hour_of."""
    return calendar.timegm((int(hour[:4]), int(hour[4:6]), int(hour[6:8]), int(hour[8:10]), 0, 0))


@lru_cache(maxsize=4096)
def _hour_name(hours_since_epoch: int) -> str:
    # Cached: a strftime per record would be a large share of the split's time.
    return datetime.fromtimestamp(hours_since_epoch * 3600, timezone.utc).strftime("%Y%m%d%H")


def parse_timestamp(value: Any) -> float | None:
    """Epoch seconds from an epoch number (s or ms) or an ISO 8601 string; None if unusable."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        try:
            seconds = value / 1000.0 if value > _MS_THRESHOLD else float(value)
        except OverflowError:
            return None
    elif isinstance(value, str):
        try:
            seconds = float(value)
            if seconds > _MS_THRESHOLD:
                seconds /= 1000.0
        except ValueError:
            try:
                parsed = datetime.fromisoformat(value)
            except ValueError:
                return None
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            seconds = parsed.timestamp()
    else:
        return None
    if not 0 <= seconds < _MAX_SECONDS:  # also rejects NaN
        return None
    return seconds


def ingest_seconds(record: KafkaRecord) -> float:
    """The Kafka timestamp, or now when the producer set none (-1) or an impossible one.

    Only the split task reads it, once per batch (its result is committed atomically), so
    falling back to the clock cannot file a redelivered record under a second hour.
    """
    seconds = record.timestamp / 1000.0
    return seconds if 0 <= seconds < _MAX_SECONDS else time.time()


def looks_like_json_object(value: bytes) -> bool:
    return value.lstrip()[:1] == b"{"


def event_time(line: bytes, field_name: str) -> float | None:
    """The event time of an archived line: its JSON field `field_name`, None if it has none."""
    if not field_name or not looks_like_json_object(line):
        return None
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return parse_timestamp(doc.get(field_name)) if isinstance(doc, dict) else None


@lru_cache(maxsize=65536)
def valid_app_id(app: str) -> bool:
    return APP_ID_PATTERN.fullmatch(app) is not None


def _app_id_reader(source: str) -> Callable[[KafkaRecord, Any], Any]:
    """A function (record, parsed JSON or None) -> raw app id, built from `app_id_source`."""
    kind, _, arg = source.partition(":")
    if kind == "json":
        return lambda record, doc: doc.get(arg) if isinstance(doc, dict) else None
    if kind == "key":
        return lambda record, doc: record.key
    if kind == "header":
        def from_header(record: KafkaRecord, doc: Any) -> Any:
            for name, value in record.headers:
                if name == arg:
                    return value
            return None
        return from_header
    if kind == "regex":
        pattern = re.compile(arg.encode())
        group: int | str = "app" if "app" in pattern.groupindex else 1
        if pattern.groups < 1:
            raise ValueError(f"app_id_source regex {arg!r} needs a capturing group")

        def from_regex(record: KafkaRecord, doc: Any) -> Any:
            match = pattern.search(record.value or b"")  # None was rejected as empty before
            return match.group(group) if match else None
        return from_regex
    raise ValueError(f"unknown app_id_source {source!r}")


@dataclass
class Router:
    """Decides the (app, hour) group of each record; built once per process from settings."""

    app_id_source: str = "json:app"
    timestamp_field: str = "ts"
    record_max_bytes: int = 1024 * 1024

    def __post_init__(self) -> None:
        self._read_app = _app_id_reader(self.app_id_source)
        self._needs_json = self.app_id_source.startswith("json:")
        self._json_app = self.app_id_source.partition(":")[2] if self._needs_json else None

    def route(self, record: KafkaRecord) -> tuple[str, str, bytes]:
        """(app, hour, line) for a good record; raises Rejected with the reason otherwise."""
        app, hours, line, _ = self._place(record)
        return app, _hour_name(int(hours)), line

    def _place(self, record: KafkaRecord) -> tuple[str, float, bytes, float | None]:
        """`route`, with the hour as hours since the epoch, and the event time (None if the
        record has none and was placed by its Kafka timestamp)."""
        if type(record) is Record and record.flaw:
            raise Rejected(record.flaw)
        value = record.value
        if value is None:
            raise Rejected("empty")
        if len(value) > self.record_max_bytes:
            raise Rejected("oversized")
        if value.endswith(b"\n"):  # a producer's line terminator, not content
            value = value[:-1]
        if b"\n" in value:
            raise Rejected("multiline")
        doc: Any = None
        if self._needs_json or (self.timestamp_field and looks_like_json_object(value)):
            try:
                doc = orjson.loads(value)
            except orjson.JSONDecodeError:
                if self._needs_json or not _is_utf8(value):
                    raise Rejected("undecodable") from None
        elif not _is_utf8(value):
            raise Rejected("undecodable")
        app = self._read_app(record, doc)
        if app is None:
            raise Rejected("missing_app_id")
        if isinstance(app, bytes):
            try:
                app = app.decode("ascii")
            except UnicodeDecodeError:
                raise Rejected("bad_app_id") from None
        if not isinstance(app, str) or not valid_app_id(app):
            raise Rejected("bad_app_id")
        event = None
        if self.timestamp_field and isinstance(doc, dict):
            event = parse_timestamp(doc.get(self.timestamp_field))
        seconds = ingest_seconds(record) if event is None else event
        return app, seconds // 3600, value, event

    def group(self, records: Iterable[KafkaRecord], topic: str, partition: int,
              reasons: collections.Counter[str] | None = None,
              spans: dict[tuple[str, str], tuple[float, float]] | None = None,
              ) -> dict[tuple[str, str], list[bytes]]:
        """Every record lands in exactly one group; rejected ones in the quarantine app, each
        counted by its reason in `reasons` if given. If `spans` is given, it receives each
        group's earliest and latest event time (seconds); a group with a record that has none
        (placed by its Kafka timestamp, or quarantined) spans its whole hour, so a reader that
        skips what lies outside a time window never skips such a record.

        The usual record (one line of JSON with a valid app id and a numeric event time) takes
        a short path through the same checks as `route`, inline (the split's hot loop);
        anything else, or anything unusual about it, goes through `route` itself.
        """
        # (app, hours since the epoch): its lines and their event times, found with one lookup
        groups: dict[tuple[str, float], tuple[list[bytes], list[float]]] = {}
        untimed: set[tuple[str, float]] = set()
        app_field, ts_field, max_bytes = self._json_app, self.timestamp_field, self.record_max_bytes
        loads, decode_error = orjson.loads, orjson.JSONDecodeError
        for record in records:
            value = record.value
            if app_field is not None and ts_field and type(record) is not Record and value is not None \
                    and len(value) <= max_bytes and b"\n" not in value:
                try:
                    doc = loads(value)
                except decode_error:
                    doc = None
                if type(doc) is dict:
                    app, ts = doc.get(app_field), doc.get(ts_field)
                    if type(app) is str and (type(ts) is float or type(ts) is int):
                        seconds = ts / 1000.0 if ts > _MS_THRESHOLD else ts
                        if 0 <= seconds < _MAX_SECONDS:
                            key = (app, seconds // 3600)
                            entry = groups.get(key)
                            if entry is None and valid_app_id(app):  # checked once per group
                                entry = groups[key] = ([], [])
                            if entry is not None:
                                entry[0].append(value)
                                entry[1].append(seconds)
                                continue
            event: float | None = None
            try:
                app, hours, line, event = self._place(record)
            except Rejected as why:
                app, hours = QUARANTINE_APP, ingest_seconds(record) // 3600
                line = quarantine_line(record, str(why), topic, partition)
                if reasons is not None:
                    reasons[str(why)] += 1
            key = (app, hours)
            entry = groups.get(key)
            if entry is None:
                entry = groups[key] = ([], [])
            entry[0].append(line)
            if event is None:
                untimed.add(key)
            else:
                entry[1].append(event)
        if spans is not None:
            for key, (_, seen) in groups.items():
                start = key[1] * 3600
                lo, hi = (min(seen), max(seen)) if seen else (start + 3600, start)
                if key in untimed:
                    lo, hi = min(lo, start), max(hi, start + 3600)
                spans[(key[0], _hour_name(int(key[1])))] = (lo, hi)
        return {(app, _hour_name(int(hours))): lines for (app, hours), (lines, _) in groups.items()}


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _header_entry(name: str | bytes, value: bytes | None) -> list[str]:
    """[name, value in base64]; a name that is not UTF-8 is shown escaped and kept in base64."""
    encoded = base64.b64encode(value or b"").decode()
    if isinstance(name, bytes):
        return [name.decode("utf-8", "backslashreplace"), encoded, base64.b64encode(name).decode()]
    return [name, encoded]


def quarantine_line(record: KafkaRecord, reason: str, topic: str, partition: int) -> bytes:
    """A one-line JSON envelope that keeps every byte of a rejected record."""
    value = record.value or b""
    envelope: dict[str, Any] = {
        "reason": reason,
        "topic": topic,
        "partition": partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp,
        "key_b64": base64.b64encode(record.key).decode() if record.key is not None else None,
        "value_b64": base64.b64encode(value).decode(),
        "headers": [_header_entry(name, v) for name, v in record.headers],
    }
    return orjson.dumps(envelope)
