"""`sluice fetch`: one app's records in a time window, from the store and the spool alike.

Only that app's hour prefixes are listed. For each hour, the spool is read first: the committed
sizes of its open and sealed files are read from Redis in one transaction, and every file is
opened at once (an open descriptor keeps its bytes readable whatever a seal or an upload then
does to the name). The store is listed only after that, so a file that left the spool in the
meantime is found there. A piece that shows up in both (moved while we read) is printed once:
every frame is announced with its piece id (sluice.frames). Fetch only reads: it takes no lock
and changes nothing in the spool.
"""

from __future__ import annotations

import os
import heapq
import queue
import re
import struct
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from operator import itemgetter
from typing import BinaryIO, Callable, Iterator

import orjson
import redis

from sluice.frames import Damaged, read_frames
from sluice.records import QUARANTINE_APP, hour_start, looks_like_json_object, parse_timestamp, valid_app_id
from sluice.slots import committed_files
from sluice.spool import Spool
from sluice.store import Store, hour_prefix, lineage, live_keys

# Objects read (and decompressed: zstd lets go of the GIL) at once; store reads are network-bound.
READ_THREADS = 8
# Decompressed frames a reader may hold ahead of the printer, per object.
READ_AHEAD = 1
# How often --follow looks for new records.
FOLLOW_SECONDS = 0.5
# --sort keeps at most about this many bytes of lines in memory; more go to sorted runs on disk.
SORT_BUFFER_BYTES = 64 * 1024 * 1024
_RUN_ENTRY = struct.Struct("<dI")  # event time, line length

_RELATIVE = re.compile(r"-?(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}

Frames = Iterator[tuple[str | None, bytes]]


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


def _event_time(line: bytes, field_name: str) -> float | None:
    if not field_name or not looks_like_json_object(line):
        return None
    try:
        doc = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None
    return parse_timestamp(doc.get(field_name)) if isinstance(doc, dict) else None


@dataclass
class Query:
    """What to print. `until` None: no end (follow)."""

    app: str
    since: datetime
    until: datetime | None
    grep: re.Pattern[bytes] | None = None
    timestamp_field: str = "ts"
    limit: int | None = None
    count_only: bool = False
    sort: bool = False

    def check(self) -> None:
        if self.app != QUARANTINE_APP and not valid_app_id(self.app):
            raise ValueError(f"{self.app!r} is not a valid app id")
        if self.until is not None and self.until <= self.since:
            raise ValueError("--until must be later than --since")
        if self.limit is not None and self.limit < 0:
            raise ValueError("--limit must not be negative")
        if self.sort and self.until is None:
            raise ValueError("--sort needs the window's end: it cannot be used with --follow")


class SpoolReader:
    """The spool of this machine, read only: committed sizes from Redis, bytes from the files."""

    def __init__(self, client: redis.Redis, spool_dir: Path, slots_per_app: int) -> None:
        self.r, self.spool, self.n = client, Spool(spool_dir), slots_per_app

    def open_files(self, app: str, hour: str) -> list[tuple[str, int, int]]:
        """(fid, open descriptor, committed size) of the app-hour's files; the caller closes."""
        opened = []
        for fid, size in committed_files(self.r, app, hour, self.n):
            for path in (self.spool.open_path(app, hour, fid), self.spool.sealed_path(app, hour, fid)):
                try:
                    opened.append((fid, os.open(path, os.O_RDONLY), size))
                    break
                except FileNotFoundError:
                    continue  # sealed or uploaded since: the next place, or the store, has it
        return opened


class _Range:
    """Bytes [start, end) of a descriptor, as a stream."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd, self.pos, self.end = fd, start, end

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        data = os.pread(self.fd, n, self.pos) if n > 0 else b""
        self.pos += len(data)
        return data


class _Enough(Exception):
    """--limit reached."""


class _HourSorter:
    """The lines of one hour in event-time order: sorted in memory up to SORT_BUFFER_BYTES, in
    sorted runs on disk beyond that, merged at the end. Lines with no event time come first."""

    def __init__(self, field_name: str) -> None:
        self.field, self.lines, self.size = field_name, [], 0
        self.runs: list[BinaryIO] = []

    def add(self, line: bytes) -> None:
        ts = _event_time(line, self.field)
        self.lines.append((-1.0 if ts is None else ts, line))
        self.size += len(line) + 64
        if self.size >= SORT_BUFFER_BYTES:
            self._spill()

    def _spill(self) -> None:
        self.lines.sort(key=itemgetter(0))
        run = tempfile.TemporaryFile()
        for ts, line in self.lines:
            run.write(_RUN_ENTRY.pack(ts, len(line)) + line)
        run.seek(0)
        self.runs.append(run)
        self.lines, self.size = [], 0

    @staticmethod
    def _read_run(run: BinaryIO) -> Iterator[tuple[float, bytes]]:
        with run:
            while head := run.read(_RUN_ENTRY.size):
                ts, length = _RUN_ENTRY.unpack(head)
                yield ts, run.read(length)

    def drain(self) -> Iterator[bytes]:
        self.lines.sort(key=itemgetter(0))
        runs = [self._read_run(run) for run in self.runs]
        for _, line in heapq.merge(*runs, iter(self.lines), key=itemgetter(0)):
            yield line
        self.lines, self.size, self.runs = [], 0, []


@dataclass
class _Printer:
    out: BinaryIO
    query: Query
    count: int = 0
    sorter: _HourSorter | None = None

    def __post_init__(self) -> None:
        if self.query.sort and not self.query.count_only:
            self.sorter = _HourSorter(self.query.timestamp_field)

    def block(self, data: bytes, hour: str) -> None:
        """Print the matching lines of newline-terminated `data`, all filed under one event hour.

        An hour wholly inside the window needs no line to be parsed for its time, and without
        --grep, --limit or --sort not even split into lines."""
        q = self.query
        start, lo = hour_start(hour), q.since.timestamp()
        hi = q.until.timestamp() if q.until is not None else float("inf")
        whole = lo <= start and start + 3600 <= hi
        if whole and q.grep is None and q.limit is None and self.sorter is None:
            self.count += data.count(b"\n")
            if not q.count_only:
                self.out.write(data)
            return
        for line in data.split(b"\n")[:-1]:
            if q.grep is not None and not q.grep.search(line):
                continue
            if not whole:
                ts = _event_time(line, q.timestamp_field)
                if ts is not None and not lo <= ts < hi:
                    continue
            if self.sorter is not None:
                self.sorter.add(line)
            else:
                self._print(line)

    def _print(self, line: bytes) -> None:
        if self.query.limit is not None and self.count >= self.query.limit:
            raise _Enough
        self.count += 1
        if not self.query.count_only:
            self.out.write(line + b"\n")

    def end_hour(self) -> None:
        """With --sort, an hour's lines are printed once all of them are read."""
        if self.sorter is not None:
            for line in self.sorter.drain():
                self._print(line)
        if self.query.limit is not None and self.count >= self.query.limit:
            raise _Enough


@dataclass
class _HourState:
    seen: set[str] = field(default_factory=set)  # ids of the pieces printed
    local: dict[str, int] = field(default_factory=dict)  # spool fid -> bytes of it read
    keys: set[str] = field(default_factory=set)  # store objects read


@dataclass
class Fetch:
    """One `sluice fetch`: `run()` prints the window, `follow()` then goes on."""

    store: Store
    query: Query
    out: BinaryIO
    spool: SpoolReader | None = None
    warn: Callable[[str], None] = lambda message: None
    damaged: bool = False  # an object could not be read whole
    hours: dict[str, _HourState] = field(default_factory=dict)
    clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)

    def __post_init__(self) -> None:
        self.query.check()
        self.printer = _Printer(self.out, self.query)

    @property
    def count(self) -> int:
        return self.printer.count

    def run(self) -> int:
        """Print the window; returns how many records matched."""
        until = self.query.until or self.clock()
        try:
            for hour in hours_between(self.query.since, until):
                self._read_hour(hour)
                self.printer.end_hour()
        except _Enough:
            pass
        return self.count

    def follow(self, stop: threading.Event) -> int:
        """After `run()`: print each new matching record as it is committed, until `stop`.

        Looks at the running hour and the one before it (where late seals and uploads land)."""
        try:
            while self.query.limit is None or self.count < self.query.limit:
                self.out.flush()
                if stop.wait(FOLLOW_SECONDS):
                    break
                now = self.clock()
                recent = max(self.query.since, now - timedelta(hours=1))
                for hour in hours_between(recent, now + timedelta(seconds=1)):
                    self._read_hour(hour)
                    self.printer.end_hour()
        except _Enough:
            pass
        return self.count

    def _read_hour(self, hour: str) -> None:
        state = self.hours.setdefault(hour, _HourState())
        local = self._spool_files(hour)  # before listing the store: see the module docstring
        try:
            listed = live_keys(self.store.list(hour_prefix(self.query.app, hour)))
            sources: list[tuple[str, Callable[[], Frames]]] = []
            for fid, fd, size in local:
                start = state.local.get(fid, 0)
                if size > start:
                    state.local[fid] = size
                    sources.append((f"spool file {fid}",
                                    lambda fd=fd, a=start, b=size: read_frames(_Range(fd, a, b))))
            for key in listed:
                if key not in state.keys:
                    state.keys.add(key)
                    sources.append((key, lambda key=key: self._object_frames(hour, key)))
            for name, ident, data in _read_ahead(sources):
                if isinstance(data, Exception):
                    self.damaged = True
                    self.warn(f"{name}: {data}; everything else is printed")
                elif ident is None or ident not in state.seen:
                    if ident is not None:
                        state.seen.add(ident)
                    self.printer.block(data, hour)
        finally:
            for _, fd, _ in local:
                os.close(fd)

    def _spool_files(self, hour: str) -> list[tuple[str, int, int]]:
        if self.spool is None:
            return []
        try:
            return self.spool.open_files(self.query.app, hour)
        except (redis.RedisError, OSError) as exc:
            self.warn(f"the spool is not readable from here ({exc}); printing what the store has")
            self.spool = None
            return []

    def _object_frames(self, hour: str, key: str) -> Frames:
        with _open_newest(self.store, hour_prefix(self.query.app, hour), key) as stream:
            yield from read_frames(stream)


def _read_ahead(sources: list[tuple[str, Callable[[], Frames]]],
                ) -> Iterator[tuple[str, str | None, bytes | Exception]]:
    """(source name, piece id, data) of every source in order. READ_THREADS threads read and
    decompress the sources at once, each at most READ_AHEAD frames ahead of the caller; a
    source that fails ends with the exception as its data."""
    if not sources:
        return
    stop = threading.Event()
    queues: list[queue.Queue] = [queue.Queue(maxsize=READ_AHEAD) for _ in sources]
    end = object()

    def put(q: queue.Queue, item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def pump(frames: Callable[[], Frames], q: queue.Queue) -> None:
        try:
            for item in frames():
                if not put(q, item):
                    return
        except (Damaged, OSError) as exc:
            put(q, (None, exc))
        put(q, end)

    pool = ThreadPoolExecutor(max_workers=min(READ_THREADS, len(sources)), thread_name_prefix="fetch")
    try:
        for (_, frames), q in zip(sources, queues):
            pool.submit(pump, frames, q)
        for (name, _), q in zip(sources, queues):
            while (item := q.get()) is not end:
                ident, data = item
                yield name, ident, data
    finally:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)


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
          grep: re.Pattern[bytes] | None = None, timestamp_field: str = "ts",
          spool: SpoolReader | None = None) -> int:
    """Write matching lines to `out`; returns how many. Lines with no event time are kept
    when their hour partition overlaps the window."""
    return Fetch(store, Query(app, since, until, grep, timestamp_field), out, spool).run()
