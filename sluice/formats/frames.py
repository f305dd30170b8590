"""The archive format: zstd frames, each announced by a skippable frame that says what it holds,
and, at the end of every object, an index of them.

Every zstd decoder passes over skippable frames (the CLI, libzstd, DuckDB), so an archive reads as
plain zstd everywhere. Before each zstd frame sluice writes one, holding the frame's *meta*,
`<I length><I bytes><I records><q min><q max>`: the length of the zstd frame that follows, its
decompressed size, its lines, and the earliest and latest event time of its lines in
milliseconds (a frame with a line that has no event time spans its whole hour). Then one of:

- `PIECE_MAGIC`, a **piece**: the lines of one app-hour from one batch; the piece id
  (`bid|app|hour`, UTF-8).
- `TAIL_MAGIC`, a **tail frame** (sluice.archive.tail): the small pieces of many apps from one batch and
  hour, one after the other; `<H n>`, then per piece `<I bytes><I records><q min><q max><B len>`
  and its app id, then `bid|hour`. A reader wanting one app decompresses only the frames that
  list it, and takes its bytes.
- `GATHERED_MAGIC`, an app's lines **gathered from tail files** into one frame when they are
  archived; `<H n>`, then per tail file `<8s>` (the 16 hex digits of its fid, as bytes) `<I bytes>`:
  which bytes of the frame came from which tail file, in order.

Files written before this format announce pieces with `OLD_PIECE_MAGIC` (`<I length>` and the id,
no meta), or not at all; both are still read.

**The index.** Every object ends with a skippable frame `INDEX_MAGIC` listing its frames, so a
reader finds the ones it needs from one ranged read of the object's tail: per frame
`<Q offset><I length>` (where its announcement starts, and its length with the announcement)
and its meta's `<I bytes><I records><q min><q max>`; then the footer `<I count><I crc32 of the
entries><4s b"SLX1">`. Offsets run from 0, each frame starts where the one before ends, and the
last ends where the index begins; a reader that finds otherwise (or a wrong CRC) must not trust
it. Spool files have no index yet: readers walk their announcements.

All integers are little-endian. `sluice fetch` uses the ids to print a piece once when it is
read from the spool and again from the store (a seal or an upload moved its file meanwhile), the
meta and the index to read only the frames a time window needs, and reads one frame at a time,
so its memory is bounded by a frame, not by the object.
"""

from __future__ import annotations

import struct
import zlib
from typing import IO, Iterator, NamedTuple, Protocol, cast

import zstandard

from sluice.core import schema
from sluice.core.errors import Damaged, NoIndex

OLD_PIECE_MAGIC = 0x184D2A53  # five of the 16 skippable-frame magics of the zstd format
TAIL_MAGIC = 0x184D2A54
GATHERED_MAGIC = 0x184D2A55
PIECE_MAGIC = 0x184D2A56
INDEX_MAGIC = 0x184D2A5F
_SKIPPABLE = range(0x184D2A50, 0x184D2A60)
_HEAD = struct.Struct("<II")  # magic, payload size (every zstd skippable frame)
_OLD_LENGTH = struct.Struct("<I")  # OLD_PIECE_MAGIC: the length of the frame that follows, then the id
_META = struct.Struct("<IIIqq")  # frame length, decompressed bytes, records, min and max time (ms)
_COUNT = struct.Struct("<H")
_TAIL_ENTRY = struct.Struct("<IIqqB")  # bytes, records, min, max, length of the app id that follows
_SOURCE = struct.Struct("<8sI")  # tail file (fid's hex digits as bytes), bytes from it
_PIECE_HEAD = struct.Struct("<I")  # entries of a tail piece in the spool (TailPiece)
_INDEX_ENTRY = struct.Struct("<QIIIqq")  # offset, length with announcement, bytes, records, min, max
_FOOTER = struct.Struct("<II4s")  # entries, crc32 of the entries, signature
SIGNATURE = b"SLX1"
UNKNOWN = 0xFFFFFFFF  # bytes or records of a frame announced before meta existed


class Meta(NamedTuple):
    """What an announcement says of its frame: decompressed bytes, lines, event-time span (ms)."""

    size: int
    records: int
    min_ms: int
    max_ms: int


class TailEntry(NamedTuple):
    """One app's piece in a tail frame."""

    app: str
    size: int
    records: int
    min_ms: int
    max_ms: int


class Block(NamedTuple):
    """Decompressed lines of one frame (or of one app's part of a tail frame).

    `ident`: the piece id, or None for a frame sluice did not announce. `sources`: for lines
    gathered from tail files, (tail file hex id, bytes) of each part, in order."""

    ident: str | None
    data: bytes
    sources: tuple[tuple[str, int], ...] = ()
    span: tuple[int, int] | None = None  # earliest and latest event time of its lines (ms), if announced
    records: int | None = None  # its lines, if announced


class Unit(NamedTuple):
    """One announced frame as it lies in a file, not decompressed: `head` is its announcement."""

    magic: int
    meta: Meta | None
    ident: str | None
    entries: tuple[TailEntry, ...]
    sources: tuple[tuple[str, int], ...]
    head: bytes
    frame: bytes

    @property
    def length(self) -> int:
        return len(self.head) + len(self.frame)


class IndexEntry(NamedTuple):
    offset: int
    length: int
    meta: Meta


class Readable(Protocol):
    """What frames are read from: a file, an object being downloaded, a range of a file."""

    def read(self, n: int = -1, /) -> bytes: ...


# --- writing --------------------------------------------------------------------------------

def announce(piece_id: str, frame: bytes, meta: Meta) -> bytes:
    """A piece's `frame` preceded by its announcement."""
    payload = _META.pack(len(frame), *meta) + piece_id.encode()
    return _HEAD.pack(PIECE_MAGIC, len(payload)) + payload + frame


def announce_tail(bid: str, hour: str, count: int, entries: bytes, frame: bytes, meta: Meta) -> bytes:
    """A tail frame (`frame` compresses the entries' bytes, in order) preceded by its
    announcement; `entries`: the `count` entries packed as a tail piece holds them."""
    payload = _META.pack(len(frame), *meta) + _COUNT.pack(count) + entries + f"{bid}|{hour}".encode()
    return _HEAD.pack(TAIL_MAGIC, len(payload)) + payload + frame


def announce_gathered(sources: list[tuple[str, int]], frame: bytes, meta: Meta) -> bytes:
    """An app's lines gathered from tail files: `sources` are (tail fid, bytes from it)."""
    payload = _META.pack(len(frame), *meta) + _COUNT.pack(len(sources)) + b"".join(
        _SOURCE.pack(bytes.fromhex(tail_file_id(fid)), size) for fid, size in sources)
    return _HEAD.pack(GATHERED_MAGIC, len(payload)) + payload + frame


class TailPiece:
    """The small pieces of one batch and hour, packed as the split stores them for the compress
    task: `<I n>`, the entries as a tail announcement lists them, then their lines, each ended
    by a newline. Built one app's lines at a time, its span kept as it goes, and its bytes
    copied once, when packed: at thousands of apps a batch has tens of thousands of small
    pieces, and each pass over them, or over their bytes, shows in the split's CPU."""

    __slots__ = ("_entries", "_lines", "count", "records", "min_ms", "max_ms")

    def __init__(self) -> None:
        self._entries: list[bytes] = []
        self._lines: list[bytes] = []
        self.count = 0
        self.records = 0
        self.min_ms = 2 ** 63 - 1
        self.max_ms = -2 ** 63

    def add(self, app: str, lines: list[bytes], size: int, min_ms: int, max_ms: int) -> None:
        """One app's lines (without their newlines), `size` bytes with a newline each (as the
        split measured them to choose the tail), spanning min_ms..max_ms of event time."""
        name, records = app.encode(), len(lines)
        self._entries += (_TAIL_ENTRY.pack(size, records, min_ms, max_ms, len(name)), name)
        self._lines += lines
        self.count += 1
        self.records += records
        if min_ms < self.min_ms:
            self.min_ms = min_ms
        if max_ms > self.max_ms:
            self.max_ms = max_ms

    def packed(self) -> bytes:
        head = _PIECE_HEAD.pack(self.count) + b"".join(self._entries)
        if not self._lines:
            return head
        # One copy of the lines: the head joins the first, and b"" ends the last with a newline.
        return b"\n".join([head + self._lines[0], *self._lines[1:], b""])


def tail_piece_parts(piece: bytes) -> tuple[int, bytes, bytes]:
    """(how many entries, the entries still packed, their bytes) of a tail piece, for
    `announce_tail` to list the entries as they are; Damaged if they do not add up."""
    at, size = _PIECE_HEAD.size, 0
    try:
        (n,) = _PIECE_HEAD.unpack_from(piece)
        for _ in range(n):
            entry_size, _records, _lo, _hi, name_len = _TAIL_ENTRY.unpack_from(piece, at)
            size += entry_size
            at += _TAIL_ENTRY.size + name_len
    except struct.error as exc:
        raise Damaged(f"a damaged tail piece: {exc}") from None
    if at > len(piece) or size != len(piece) - at:
        raise Damaged("a tail piece's entries do not add up to its data")
    return n, piece[_PIECE_HEAD.size:at], piece[at:]


def unpack_tail_piece(piece: bytes) -> tuple[list[TailEntry], bytes]:
    """(entries, their bytes) of a tail piece; Damaged if they do not add up."""
    n, packed, data = tail_piece_parts(piece)
    try:
        entries, _ = _unpack_entries(packed, 0, n)
    except (struct.error, UnicodeDecodeError) as exc:
        raise Damaged(f"a damaged tail piece: {exc}") from None
    return entries, data


def index(entries: list[IndexEntry]) -> bytes:
    """The index frame that ends an object of these frames."""
    body = b"".join(_INDEX_ENTRY.pack(e.offset, e.length, *e.meta) for e in entries)
    payload = body + _FOOTER.pack(len(entries), zlib.crc32(body), SIGNATURE)
    return _HEAD.pack(INDEX_MAGIC, len(payload)) + payload


def index_length(frames: int) -> int:
    return _HEAD.size + frames * _INDEX_ENTRY.size + _FOOTER.size


def tail_file_id(fid: str) -> str:
    """The part of a tail file's fid that gathered frames name it by: its 16 hex digits."""
    return fid.rpartition("-")[2]


def _unpack_entries(buf: bytes, at: int, n: int) -> tuple[list[TailEntry], int]:
    entries = []
    for _ in range(n):
        size, records, lo, hi, name_len = _TAIL_ENTRY.unpack_from(buf, at)
        at += _TAIL_ENTRY.size
        if at + name_len > len(buf):
            raise struct.error("an app id runs past the end")
        entries.append(TailEntry(buf[at:at + name_len].decode(), size, records, lo, hi))
        at += name_len
    return entries, at


# --- reading --------------------------------------------------------------------------------

def units(stream: Readable) -> Iterator[Unit]:
    """Every announced frame of a stream, in order, not decompressed; index frames and other
    skippable frames are passed over. Raises Damaged at the first zstd frame sluice did not
    announce (a file written before announcements; `frames_to_decode` reads those), on a damaged
    announcement, or where the stream ends inside a frame."""
    return cast(Iterator[Unit], _walk(stream, plain=False))  # only Units: plain zstd raises


def _walk(stream: Readable, plain: bool) -> Iterator[Unit | Block]:
    """The announced frames of a stream as Units, in order. At the first zstd frame sluice did
    not announce: with `plain`, it and all that follows decompressed as one stream, in Blocks of
    whole lines; else Damaged."""
    while head := _read_exactly(stream, _HEAD.size):
        magic, size = _HEAD.unpack(head)
        if magic not in _SKIPPABLE:
            if not plain:
                raise Damaged("a zstd frame without an announcement")
            yield from (Block(None, chunk) for chunk in _stream_rest(zstandard.ZstdDecompressor(), head, stream))
            return
        payload = _read_exactly(stream, size)
        if magic not in (OLD_PIECE_MAGIC, PIECE_MAGIC, TAIL_MAGIC, GATHERED_MAGIC):
            continue
        length, meta, ident, entries, sources = _announcement(magic, payload)
        yield Unit(magic, meta, ident, entries, sources, head + payload, _read_exactly(stream, length))


def decode(unit: Unit, dctx: zstandard.ZstdDecompressor, app: str | None = None) -> list[Block]:
    """The blocks of one unit: of a tail frame only `app`'s part (none if it has none, or no app
    is asked for). Damaged if the frame is corrupt or does not hold what its announcement says."""
    if unit.magic == TAIL_MAGIC and (app is None or all(e.app != app for e in unit.entries)):
        return []
    try:
        data = dctx.decompress(unit.frame)
    except zstandard.ZstdError as exc:
        raise Damaged(f"corrupt frame: {exc}") from None
    if unit.meta is not None and unit.meta.size != UNKNOWN and unit.meta.size != len(data):
        raise Damaged(f"a frame of {len(data)} bytes announced as {unit.meta.size}")
    if unit.magic != TAIL_MAGIC:
        if unit.meta is None:
            return [Block(unit.ident, data, unit.sources)]
        records = unit.meta.records if unit.meta.records != UNKNOWN else None
        return [Block(unit.ident, data, unit.sources, (unit.meta.min_ms, unit.meta.max_ms), records)]
    bid, _, hour = (unit.ident or "").rpartition("|")
    blocks, at = [], 0
    for entry in unit.entries:
        if entry.app == app:
            blocks.append(Block(schema.piece_id(bid, schema.app_hour(app, hour)), data[at:at + entry.size], (),
                                (entry.min_ms, entry.max_ms), entry.records))
        at += entry.size
    return blocks


def wanted(unit: Unit, app: str | None, lo_ms: int, hi_ms: int) -> bool:
    """Whether a unit may hold lines of `app` with an event time in [lo_ms, hi_ms), by its
    announcement alone; a unit without meta may."""
    if unit.magic == TAIL_MAGIC:
        return any(e.app == app and e.max_ms >= lo_ms and e.min_ms < hi_ms for e in unit.entries)
    return unit.meta is None or (unit.meta.max_ms >= lo_ms and unit.meta.min_ms < hi_ms)


def frames_to_decode(stream: Readable, app: str | None = None,
                     window: tuple[int, int] | None = None) -> Iterator[Unit | Block]:
    """What `read_frames` gives, but each announced frame still compressed (a Unit, for the
    caller to `decode`, perhaps in another thread); frames that cannot hold lines of `app` in
    `window` are left out, and a stream written before announcements comes as Blocks."""
    for item in _walk(stream, plain=True):
        if isinstance(item, Block) or ((window is None or wanted(item, app, *window))
                                       and (item.magic != TAIL_MAGIC or app is not None)):
            yield item


def read_frames(stream: Readable, app: str | None = None,
                window: tuple[int, int] | None = None) -> Iterator[Block]:
    """The Block of each frame in order.

    Of a tail frame, only `app`'s part, if the frame has one (the others are not decompressed).
    With a `window` [lo_ms, hi_ms), frames whose announcement shows no line in it are not
    decompressed either. A frame sluice did not announce (a file written before announcements)
    is decompressed with what follows it as one stream, in chunks, with the id None. Raises
    Damaged on a truncated or corrupt stream, after yielding everything before the damage.
    """
    dctx = zstandard.ZstdDecompressor()
    for item in frames_to_decode(stream, app, window):
        yield from (decode(item, dctx, app) if isinstance(item, Unit) else [item])


def tail_frames(stream: Readable) -> Iterator[tuple[list[TailEntry], bytes]]:
    """(entries, decompressed data) of each frame of a tail file. Damaged if the file holds
    anything but tail frames, or is cut short."""
    dctx = zstandard.ZstdDecompressor()
    for unit in units(stream):
        if unit.magic != TAIL_MAGIC:
            raise Damaged(f"a frame of kind {unit.magic:#x} in a tail file")
        try:
            data = dctx.decompress(unit.frame)
        except zstandard.ZstdError as exc:
            raise Damaged(f"corrupt frame: {exc}") from None
        if sum(e.size for e in unit.entries) != len(data):
            raise Damaged("a tail frame's announcement does not add up to its data")
        yield list(unit.entries), data


def index_entries(stream: Readable, hour_start_ms: int) -> list[IndexEntry]:
    """The index of a file of announced frames, from their announcements (the frames are read
    past, not decompressed). A frame announced before meta existed spans its whole hour, its
    size and records UNKNOWN."""
    out, at = [], 0
    whole = Meta(UNKNOWN, UNKNOWN, hour_start_ms, hour_start_ms + 3_600_000 - 1)
    for unit in units(stream):
        out.append(IndexEntry(at, unit.length, unit.meta or whole))
        at += unit.length
    return out


def parse_index(tail: bytes, object_size: int) -> list[IndexEntry]:
    """The index at the end of an object of `object_size` bytes, given its last bytes (at
    least the whole index frame; see `index_span`). Damaged if there is none or it cannot be
    trusted: a wrong CRC, frames that overlap, leave gaps, or run past where the index starts."""
    if len(tail) < _HEAD.size + _FOOTER.size:
        raise NoIndex("no index: the object is too short")
    count, crc, signature = _FOOTER.unpack_from(tail, len(tail) - _FOOTER.size)
    if signature != SIGNATURE:
        raise NoIndex("no index at the end of the object")
    length = index_length(count)
    if length > len(tail) or length > object_size:
        raise Damaged(f"an index of {count} frames is longer than the object")
    magic, size = _HEAD.unpack_from(tail, len(tail) - length)
    if magic != INDEX_MAGIC or size != length - _HEAD.size:
        raise Damaged("the index's frame header is damaged")
    body = tail[len(tail) - length + _HEAD.size:len(tail) - _FOOTER.size]
    if zlib.crc32(body) != crc:
        raise Damaged("the index's CRC does not match")
    entries = [IndexEntry(o, n, Meta(*rest)) for o, n, *rest in _INDEX_ENTRY.iter_unpack(body)]
    at = 0
    for entry in entries:
        if entry.offset != at or entry.length <= 0:
            raise Damaged(f"the index's frame at {entry.offset} does not follow the one before it (at {at})")
        at += entry.length
    if at != object_size - length:
        raise Damaged(f"the index's frames end at {at}, the index starts at {object_size - length}")
    return entries


def index_span(tail: bytes) -> int | None:
    """How many bytes from the end the index frame takes, from at least its footer; None if
    there is no index footer."""
    if len(tail) < _FOOTER.size:
        return None
    count, _, signature = _FOOTER.unpack_from(tail, len(tail) - _FOOTER.size)
    return index_length(count) if signature == SIGNATURE else None


def _announcement(magic: int, payload: bytes) -> tuple[int, Meta | None, str | None, tuple[TailEntry, ...],
                                                         tuple[tuple[str, int], ...]]:
    """(frame length, meta, id, tail entries, gathered sources) of an announcement."""
    try:
        if magic == OLD_PIECE_MAGIC:
            (length,) = _OLD_LENGTH.unpack_from(payload)
            return length, None, payload[_OLD_LENGTH.size:].decode(), (), ()
        length, *meta_fields = _META.unpack_from(payload)
        meta = Meta(*meta_fields)
        at = _META.size
        if magic == PIECE_MAGIC:
            return length, meta, payload[at:].decode(), (), ()
        (n,) = _COUNT.unpack_from(payload, at)
        at += _COUNT.size
        if magic == TAIL_MAGIC:
            entries, at = _unpack_entries(payload, at, n)
            return length, meta, payload[at:].decode(), tuple(entries), ()
        sources = tuple((raw.hex(), size) for raw, size in
                        (_SOURCE.unpack_from(payload, at + i * _SOURCE.size) for i in range(n)))
        return length, meta, None, (), sources
    except (struct.error, UnicodeDecodeError) as exc:
        raise Damaged(f"a damaged announcement: {exc}") from None


def _read_exactly(stream: Readable, n: int) -> bytes:
    data = stream.read(n)
    while data and len(data) < n:
        more = stream.read(n - len(data))
        if not more:
            break
        data += more
    if data and len(data) < n:
        raise Damaged(f"ends {n - len(data)} bytes short of a frame")
    return data


class _Prefixed:
    def __init__(self, first: bytes, rest: Readable) -> None:
        self.first, self.rest = first, rest

    def read(self, n: int = -1) -> bytes:
        if self.first:
            out, self.first = self.first, b""
            return out
        return self.rest.read(n)


def _stream_rest(dctx: zstandard.ZstdDecompressor, head: bytes, stream: Readable) -> Iterator[bytes]:
    """Whole lines, about a MiB at a time."""
    reader = dctx.stream_reader(cast(IO[bytes], _Prefixed(head, stream)), read_across_frames=True)
    rest = b""
    try:
        while chunk := reader.read(1024 * 1024):
            cut = chunk.rfind(b"\n") + 1
            if cut:
                yield rest + chunk[:cut]
                rest = chunk[cut:]
            else:
                rest += chunk
    except zstandard.ZstdError as exc:
        raise Damaged(f"corrupt zstd stream: {exc}") from None
    if rest:
        yield rest + b"\n"
