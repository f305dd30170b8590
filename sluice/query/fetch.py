"""`sluice fetch`: one app's records in a time window, from the store and the spool alike.

Only that app's hour prefixes are listed. For each hour, the spool is read first: the committed
sizes of its open and sealed files are read from Redis in one transaction, and every file is
opened at once (an open descriptor keeps its bytes readable whatever a seal or an upload then
does to the name). The store is listed only after that, so a file that left the spool in the
meantime is found there. A piece that shows up in both (moved while we read) is printed once:
every frame is announced with its piece id (sluice.formats.frames). The app's small pieces are in the
hour's tail files (sluice.archive.tail), read too; once archived, they are in a frame that says which of
its bytes came from which tail file, so what was printed from a tail file is not printed again.
Fetch only reads: it takes no lock and changes nothing in the spool.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Callable, NamedTuple

from sluice.archive.store import Store, hour_prefix, live_keys, open_newest, read_index
from sluice.core import schema
from sluice.core.errors import Damaged, NoIndex
from sluice.formats.frames import (
    UNKNOWN,
    Block,
    IndexEntry,
    Readable,
    Unit,
    frames_to_decode,
    tail_file_id,
    units,
    wanted,
)
from sluice.formats.records import QUARANTINE_APP, event_time, hour_start, valid_app_id
from sluice.formats.spool import FileRange, Spool
from sluice.query.read_ahead import Frames, Undecoded, read_ahead
from sluice.query.timewindow import hours_between
from sluice.query.where import Filters, Where, lines_containing, lines_matching
from sluice.slots.sealed import committed_files

if TYPE_CHECKING:  # loaded only when needed: a fetch starts faster without them
    import redis

    from sluice.query.external_sort import HourSorter

# Bytes that make a --grep pattern more than plain text.
_REGEX_SPECIAL = set(b".^$*+?{}[]\\|()")

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
    where: tuple[Where, ...] = ()

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


class _Enough(Exception):
    """--limit reached."""


@dataclass
class Stats:
    """What a fetch read, for --stats."""

    objects_listed: int = 0
    frames_listed: int = 0  # in the indexes of the objects read by index
    frames_skipped: int = 0  # by the index or an announcement: not read, or not decompressed
    frames_read: int = 0
    compressed_bytes: int = 0  # read from the store and the spool
    decompressed_bytes: int = 0
    lines_scanned: int = 0  # looked at one by one (the others were printed or counted whole)
    lines_matched: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        rate = self.compressed_bytes / self.seconds / 1e6 if self.seconds else 0.0
        return [f"objects listed {self.objects_listed}",
                f"frames listed {self.frames_listed}, skipped {self.frames_skipped}, read {self.frames_read}",
                f"bytes compressed {self.compressed_bytes:,}, decompressed {self.decompressed_bytes:,}",
                f"lines scanned {self.lines_scanned:,}, matched {self.lines_matched:,}",
                f"seconds {self.seconds:.3f}, {rate:.1f} MB/s compressed"]


class Found(NamedTuple):
    """The lines of a block a query wants, and how many of its lines were looked at one by one."""

    lines: list[bytes]
    scanned: int


@dataclass
class _Printer:
    out: BinaryIO
    query: Query
    stats: Stats
    count: int = 0
    sorter: HourSorter | None = None

    def __post_init__(self) -> None:
        if self.query.sort and not self.query.count_only:
            from sluice.query.external_sort import HourSorter

            self.sorter = HourSorter(self.query.timestamp_field)
        self.filters = Filters(self.query.where)
        # A --grep pattern that is plain text is searched for as bytes, faster than the regex engine.
        grep = self.query.grep
        self.grep_literal = grep.pattern if grep is not None and grep.pattern and not grep.flags & re.IGNORECASE \
            and not set(grep.pattern) & _REGEX_SPECIAL else None

    def matching(self, hour: str, block: Block) -> Found | None:
        """The lines of `block` (filed under `hour`) that the query wants, or None if it wants
        all of them: an hour or a frame wholly inside the window needs no line parsed for its
        time, and without --grep or --where not even split into lines. The lines that can match
        are found by searching the whole block for the filters' literal or the --grep pattern.
        Pure, so fetch calls it in the thread that decompressed the block, beside the others."""
        q, data = self.query, block.data
        lo, hi = _bounds(q)
        span = block.span
        whole = _covers_hour(q, hour) or (span is not None and lo * 1000 <= span[0] and span[1] < hi * 1000)
        if whole and q.grep is None and not self.filters:
            return None
        if self.filters.literal is not None:
            lines = lines_containing(data, self.filters.literal)
        elif self.grep_literal is not None:
            lines = lines_containing(data, self.grep_literal)
        elif q.grep is not None:
            lines = lines_matching(data, q.grep)
        else:
            lines = data.split(b"\n")[:-1]
        scanned = len(lines)
        if q.grep is not None and self.filters.literal is not None:
            lines = [line for line in lines if q.grep.search(line)]
        if self.filters:
            lines = [line for line in lines if self.filters.holds(line)]
        if not whole:
            field = q.timestamp_field
            lines = [line for line in lines if (ts := event_time(line, field)) is None or lo <= ts < hi]
        return Found(lines, scanned)

    def block(self, block: Block, found: Found | None) -> None:
        """Print the lines of `block` the query wants: `found`, its `matching`."""
        q = self.query
        if found is None:
            if self.sorter is None and q.limit is None:
                self.count += block.records if block.records is not None else block.data.count(b"\n")
                if not q.count_only:
                    self.out.write(block.data)
                return
            lines = block.data.split(b"\n")[:-1]
        else:
            self.stats.lines_scanned += found.scanned
            lines = found.lines
        if self.sorter is not None:
            for line in lines:
                self.sorter.add(line)
            return
        enough = q.limit is not None and self.count + len(lines) > q.limit
        if enough:
            lines = lines[:max(0, q.limit - self.count)]  # type: ignore[operator]
        self.count += len(lines)
        if lines and not q.count_only:
            self.out.write(b"\n".join(lines) + b"\n")
        if enough:
            raise _Enough

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
        self.stats = Stats()
        self.printer = _Printer(self.out, self.query, self.stats)

    @property
    def count(self) -> int:
        return self.printer.count

    def run(self) -> int:
        """Print the window; returns how many records matched."""
        until = self.query.until or self.clock()
        started = time.perf_counter()
        try:
            for hour in hours_between(self.query.since, until):
                self._read_hour(hour)
                self.printer.end_hour()
        except _Enough:
            pass
        self.stats.seconds += time.perf_counter() - started
        self.stats.lines_matched = self.count
        return self.count

    def _window_ms(self, hour: str) -> tuple[int, int] | None:
        """The window in ms, if it does not cover the whole hour (then frames may be skipped)."""
        if _covers_hour(self.query, hour):
            return None
        lo, hi = _bounds(self.query)
        return math.floor(lo * 1000), (math.ceil(hi * 1000) if hi != float("inf") else 2**62)

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
            window = self._window_ms(hour)
            self.stats.objects_listed += len(listed)
            for fid, fd, size, tail in local:
                start = state.local.get(fid, 0)
                if size > start:
                    state.local[fid] = size
                    self.stats.compressed_bytes += size - start
                    name = f"spool file {fid}"
                    # A tail file is read whole: what fetch read of it must be known to the byte
                    # (see _unprinted), and it is small.
                    sources.append((name, functools.partial(_pending, FileRange(fd, start, size), self.query.app,
                                                            None if tail else window)))
                    if tail:
                        tails[name] = tail_file_id(fid)
            from_index = window is None and not local and self._counts_only()
            for key in listed:
                if key not in state.keys:
                    state.keys.add(key)
                    counted = self._count_from_index(key) if from_index else None
                    if counted is not None:
                        self.printer.count += counted  # a whole hour, nothing to filter: the index knows
                    else:
                        sources.append((key, functools.partial(self._object_frames, hour, key)))
            for name, block, found in read_ahead(sources, functools.partial(self.printer.matching, hour)):
                if isinstance(block, Exception):
                    self.damaged = True
                    self.warn(f"{name}: {block}; everything else is printed")
                    continue
                self.stats.frames_read += 1
                self.stats.decompressed_bytes += len(block.data)
                if block.sources:
                    rest = Block(block.ident, _unprinted(block, state.tail_bytes))
                    self.printer.block(rest, self.printer.matching(hour, rest))
                elif block.ident is None or block.ident not in state.seen:
                    if block.ident is not None:
                        state.seen.add(block.ident)
                    if name in tails:
                        state.tail_bytes[tails[name]] = state.tail_bytes.get(tails[name], 0) + len(block.data)
                    self.printer.block(block, found)
        finally:
            for _, fd, _, _ in local:
                os.close(fd)

    def _spool_files(self, hour: str) -> list[tuple[str, int, int, bool]]:
        if self.spool is None:
            return []
        from redis import RedisError

        try:
            return self.spool.open_files(self.query.app, hour)
        except (RedisError, OSError) as exc:
            self.warn(f"the spool is not readable from here ({exc}); printing what the store has")
            self.spool = None
            return []

    def _object_frames(self, hour: str, key: str) -> Frames:
        """The blocks of an object that may hold lines of the window: with a window narrower
        than the hour, only the frames its index says overlap it, each read by a ranged read and
        checked against the index; the whole object otherwise, or if its index is missing,
        damaged or disagrees with a frame (then said on stderr: nothing is skipped because of a
        damaged index)."""
        window = self._window_ms(hour)
        done: set[int] = set()  # offsets of frames read by index
        if window is not None:
            try:
                yield from self._indexed(key, window, done)
                return
            except (FileNotFoundError, NoIndex):
                pass  # replaced by a merge since it was listed (its successor is read whole), or
                # archived before indexes existed
            except (Damaged, OSError) as exc:
                self.warn(f"{key}: its index cannot be used ({exc}); reading every frame")
        with open_newest(self.store, hour_prefix(self.query.app, hour), key) as stream:
            counted = _Counted(stream)
            try:
                yield from _walk(counted, self.query.app, window, done, self.stats)
            finally:
                self.stats.compressed_bytes += counted.count

    def _counts_only(self) -> bool:
        q = self.query
        return q.count_only and q.grep is None and not q.where and q.limit is None

    def _count_from_index(self, key: str) -> int | None:
        """The records of an object by its index, without reading its frames; None if it has no
        index to trust, or one with frames of unknown size."""
        try:
            size = self.store.size(key)
            entries = read_index(self.store, key, size) if size is not None else None
        except (Damaged, OSError):
            return None
        if not entries or any(e.meta.records == UNKNOWN for e in entries):
            return None
        self.stats.frames_listed += len(entries)
        self.stats.frames_skipped += len(entries)
        return sum(e.meta.records for e in entries)

    def _indexed(self, key: str, window: tuple[int, int], done: set[int]) -> Frames:
        size = self.store.size(key)
        if size is None:
            raise FileNotFoundError(key)
        entries = read_index(self.store, key, size)
        lo, hi = window
        chosen = [e for e in entries if e.meta.max_ms >= lo and e.meta.min_ms < hi]
        self.stats.frames_listed += len(entries)
        self.stats.frames_skipped += len(entries) - len(chosen)
        for run in _runs(chosen):
            start, end = run[0].offset, run[-1].offset + run[-1].length
            data = self.store.read_range(key, start, end)
            self.stats.compressed_bytes += len(data)
            stream = io.BytesIO(data)
            for entry, unit in zip(run, units(stream)):
                if unit.length != entry.length or (unit.meta is not None and unit.meta != entry.meta):
                    raise Damaged(f"the frame at {entry.offset} is not the one the index lists")
                yield Undecoded(unit, self.query.app)
                done.add(entry.offset)
            if stream.tell() != len(data):
                raise Damaged(f"the frames at {start}..{end} are not the ones the index lists")


def _bounds(query: Query) -> tuple[float, float]:
    """The window in epoch seconds; no end (follow): infinity."""
    return query.since.timestamp(), query.until.timestamp() if query.until is not None else float("inf")


def _covers_hour(query: Query, hour: str) -> bool:
    """Whether the window holds the whole hour: then no line needs its time looked at."""
    lo, hi = _bounds(query)
    start = hour_start(hour)
    return lo <= start and start + 3600 <= hi


def _runs(entries: list[IndexEntry]) -> list[list[IndexEntry]]:
    """Adjacent index entries grouped, so that each group is one ranged read."""
    runs: list[list[IndexEntry]] = []
    for entry in entries:
        if runs and runs[-1][-1].offset + runs[-1][-1].length == entry.offset:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return runs


def _walk(stream: Readable, app: str, window: tuple[int, int] | None, done: set[int], stats: Stats) -> Frames:
    """Every frame of an object, in order, but those at offsets in `done` (read by index
    already) and, with a window, those whose announcement shows no line in it. What was
    written before announcements is read as one zstd stream."""
    at = 0
    for item in frames_to_decode(stream, app):
        if isinstance(item, Block):
            yield item
            continue
        if at not in done and (window is None or wanted(item, app, *window)):
            yield Undecoded(item, app)
        elif at not in done:
            stats.frames_skipped += 1
        at += item.length


def _pending(stream: Readable, app: str, window: tuple[int, int] | None) -> Frames:
    """The frames of a spool file, to decompress in the pool."""
    for item in frames_to_decode(stream, app, window):
        yield Undecoded(item, app) if isinstance(item, Unit) else item


class _Counted:
    """A stream that counts the bytes read from it."""

    def __init__(self, stream: Readable) -> None:
        self.stream, self.count = stream, 0

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.count += len(data)
        return data


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
