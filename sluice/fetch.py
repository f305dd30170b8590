"""`sluice fetch`: one app's records in a time window, from the store and the spool alike.

Only that app's hour prefixes are listed. For each hour, the spool is read first: the committed
sizes of its open and sealed files are read from Redis in one transaction, and every file is
opened at once (an open descriptor keeps its bytes readable whatever a seal or an upload then
does to the name). The store is listed only after that, so a file that left the spool in the
meantime is found there. A piece that shows up in both (moved while we read) is printed once:
every frame is announced with its piece id (sluice.frames). The app's small pieces are in the
hour's tail files (sluice.tail), read too; once archived, they are in a frame that says which of
its bytes came from which tail file, so what was printed from a tail file is not printed again.
Fetch only reads: it takes no lock and changes nothing in the spool.
"""

from __future__ import annotations

import functools
import os
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO, Callable

import redis

from sluice import schema
from sluice.external_sort import HourSorter
from sluice.frames import Block, read_frames, tail_file_id
from sluice.read_ahead import Frames, read_ahead
from sluice.records import QUARANTINE_APP, event_time, hour_start, valid_app_id
from sluice.sealed import committed_files
from sluice.spool import Spool
from sluice.store import Store, hour_prefix, live_keys, open_newest
from sluice.timewindow import hours_between

# How often --follow looks for new records.
FOLLOW_SECONDS = 0.5


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

    def open_files(self, app: str, hour: str) -> list[tuple[str, int, int, bool]]:
        """(fid, open descriptor, committed size, whether a tail file) of the app-hour's files
        and of the hour's tail files; the caller closes."""
        opened = []
        for owner in (app, schema.TAIL_APP):
            for fid, size in committed_files(self.r, owner, hour, self.n):
                for path in (self.spool.open_path(owner, hour, fid), self.spool.sealed_path(owner, hour, fid)):
                    try:
                        opened.append((fid, os.open(path, os.O_RDONLY), size, owner == schema.TAIL_APP))
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


@dataclass
class _Printer:
    out: BinaryIO
    query: Query
    count: int = 0
    sorter: HourSorter | None = None

    def __post_init__(self) -> None:
        if self.query.sort and not self.query.count_only:
            self.sorter = HourSorter(self.query.timestamp_field)

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
                ts = event_time(line, q.timestamp_field)
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
    tail_bytes: dict[str, int] = field(default_factory=dict)  # tail file hex id -> bytes printed from it
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
            tails: dict[str, str] = {}  # source name -> tail file hex id
            for fid, fd, size, tail in local:
                start = state.local.get(fid, 0)
                if size > start:
                    state.local[fid] = size
                    name = f"spool file {fid}"
                    sources.append((name, functools.partial(read_frames, _Range(fd, start, size), self.query.app)))
                    if tail:
                        tails[name] = tail_file_id(fid)
            for key in listed:
                if key not in state.keys:
                    state.keys.add(key)
                    sources.append((key, functools.partial(self._object_frames, hour, key)))
            for name, block in read_ahead(sources):
                if isinstance(block, Exception):
                    self.damaged = True
                    self.warn(f"{name}: {block}; everything else is printed")
                elif block.sources:
                    self.printer.block(_unprinted(block, state.tail_bytes), hour)
                elif block.ident is None or block.ident not in state.seen:
                    if block.ident is not None:
                        state.seen.add(block.ident)
                    if name in tails:
                        state.tail_bytes[tails[name]] = state.tail_bytes.get(tails[name], 0) + len(block.data)
                    self.printer.block(block.data, hour)
        finally:
            for _, fd, _, _ in local:
                os.close(fd)

    def _spool_files(self, hour: str) -> list[tuple[str, int, int, bool]]:
        if self.spool is None:
            return []
        try:
            return self.spool.open_files(self.query.app, hour)
        except (redis.RedisError, OSError) as exc:
            self.warn(f"the spool is not readable from here ({exc}); printing what the store has")
            self.spool = None
            return []

    def _object_frames(self, hour: str, key: str) -> Frames:
        with open_newest(self.store, hour_prefix(self.query.app, hour), key) as stream:
            yield from read_frames(stream)


def _unprinted(block: Block, printed: dict[str, int]) -> bytes:
    """The bytes of a frame gathered from tail files that were not printed from those files
    while they were in the spool: of each file's part, what lies past what was printed (a tail
    file is read in order, and its part of the frame keeps that order)."""
    out, at = [], 0
    for tail, size in block.sources:
        out.append(block.data[at + min(printed.get(tail, 0), size):at + size])
        at += size
    out.append(block.data[at:])
    return b"".join(out)


def fetch(store: Store, app: str, since: datetime, until: datetime, out: BinaryIO,
          grep: re.Pattern[bytes] | None = None, timestamp_field: str = "ts",
          spool: SpoolReader | None = None) -> int:
    """Write matching lines to `out`; returns how many. Lines with no event time are kept
    when their hour partition overlaps the window."""
    return Fetch(store, Query(app, since, until, grep, timestamp_field), out, spool).run()
