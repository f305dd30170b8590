"""Archive files are zstd frames, each announced by a skippable frame that says what it holds.

Before every zstd frame sluice writes a zstd *skippable frame*, which every zstd decoder passes
over (the CLI, libzstd, DuckDB), holding the length of the frame that follows and one of:

- `MAGIC`, a **piece**: the lines of one app-hour from one batch; payload `<I length>` and the
  piece id (`bid|app|hour`, UTF-8).
- `TAIL_MAGIC`, a **tail frame** (sluice.tail): the small pieces of many apps from one batch and
  hour, one after the other; payload `<I length><H n>`, then per piece `<I bytes><I records>
  <B len>` and its app id, then `bid|hour`. A reader wanting one app decompresses only the frames
  that list it, and takes its bytes.
- `GATHERED_MAGIC`, an app's lines **gathered from tail files** into one frame when they are
  archived; payload `<I length><H n>`, then per tail file `<8s>` (the 16 hex digits of its fid,
  as bytes) `<I bytes>`: which bytes of the frame came from which tail file, in order.

`sluice fetch` uses them to read a piece from the spool and again from the store (a seal or an
upload moved its file while the fetch ran) without printing it twice, and to read an object one
frame at a time, so its memory is bounded by a frame, not by the object. All integers are
little-endian.
"""

from __future__ import annotations

import struct
from typing import IO, Iterator, NamedTuple, Protocol, cast

import zstandard

from sluice import schema
from sluice.errors import Damaged

__all__ = ["Damaged", "announce", "announce_tail", "announce_gathered", "pack_tail_piece", "read_frames",
           "tail_frames", "unpack_tail_piece"]

MAGIC = 0x184D2A53  # three of the 16 skippable-frame magics of the zstd format
TAIL_MAGIC = 0x184D2A54
GATHERED_MAGIC = 0x184D2A55
_SKIPPABLE = range(0x184D2A50, 0x184D2A60)
_HEAD = struct.Struct("<II")  # magic, payload size (every zstd skippable frame)
_LENGTH = struct.Struct("<I")  # sluice's payload: the length of the frame that follows, then its id
_COUNT = struct.Struct("<IH")  # the length of the frame that follows, entries
_TAIL_ENTRY = struct.Struct("<IIB")  # bytes, records, length of the app id that follows
_SOURCE = struct.Struct("<8sI")  # tail file (fid's hex digits as bytes), bytes from it
_PIECE_HEAD = struct.Struct("<I")  # entries of a tail piece in the spool (pack_tail_piece)


class TailEntry(NamedTuple):
    """One app's piece in a tail frame."""

    app: str
    size: int
    records: int


class Block(NamedTuple):
    """Decompressed lines of one frame (or of one app's part of a tail frame).

    `ident`: the piece id, or None for a frame sluice did not announce. `sources`: for lines
    gathered from tail files, (tail file hex id, bytes) of each part, in order."""

    ident: str | None
    data: bytes
    sources: tuple[tuple[str, int], ...] = ()


class Readable(Protocol):
    """What frames are read from: a file, an object being downloaded, a range of a file."""

    def read(self, n: int = -1, /) -> bytes: ...


def announce(piece_id: str, frame: bytes) -> bytes:
    """`frame` preceded by its announcement."""
    ident = piece_id.encode()
    return _HEAD.pack(MAGIC, _LENGTH.size + len(ident)) + _LENGTH.pack(len(frame)) + ident + frame


def announce_tail(bid: str, hour: str, entries: list[TailEntry], frame: bytes) -> bytes:
    """A tail frame (`frame` compresses the entries' bytes, in order) preceded by its announcement."""
    payload = _COUNT.pack(len(frame), len(entries)) + _pack_entries(entries) + f"{bid}|{hour}".encode()
    return _HEAD.pack(TAIL_MAGIC, len(payload)) + payload + frame


def pack_tail_piece(entries: list[TailEntry], data: bytes) -> bytes:
    """The small pieces of one batch and hour as the split stores them for the compress task:
    `<I n>`, the entries as a tail announcement lists them, then their bytes."""
    return _PIECE_HEAD.pack(len(entries)) + _pack_entries(entries) + data


def unpack_tail_piece(piece: bytes) -> tuple[list[TailEntry], bytes]:
    """(entries, their bytes) of a tail piece; Damaged if they do not add up."""
    try:
        (n,) = _PIECE_HEAD.unpack_from(piece)
        entries, at = _unpack_entries(piece, _PIECE_HEAD.size, n)
    except (struct.error, UnicodeDecodeError) as exc:
        raise Damaged(f"a damaged tail piece: {exc}") from None
    data = piece[at:]
    if sum(e.size for e in entries) != len(data):
        raise Damaged("a tail piece's entries do not add up to its data")
    return entries, data


def _pack_entries(entries: list[TailEntry]) -> bytes:
    parts = []
    for app, size, records in entries:
        name = app.encode()
        parts += [_TAIL_ENTRY.pack(size, records, len(name)), name]
    return b"".join(parts)


def _unpack_entries(buf: bytes, at: int, n: int) -> tuple[list[TailEntry], int]:
    entries = []
    for _ in range(n):
        size, records, name_len = _TAIL_ENTRY.unpack_from(buf, at)
        at += _TAIL_ENTRY.size
        if at + name_len > len(buf):
            raise struct.error("an app id runs past the end")
        entries.append(TailEntry(buf[at:at + name_len].decode(), size, records))
        at += name_len
    return entries, at


def announce_gathered(sources: list[tuple[str, int]], frame: bytes) -> bytes:
    """An app's lines gathered from tail files: `sources` are (tail fid, bytes from it)."""
    payload = _COUNT.pack(len(frame), len(sources)) + b"".join(
        _SOURCE.pack(bytes.fromhex(tail_file_id(fid)), size) for fid, size in sources)
    return _HEAD.pack(GATHERED_MAGIC, len(payload)) + payload + frame


def tail_file_id(fid: str) -> str:
    """The part of a tail file's fid that gathered frames name it by: its 16 hex digits."""
    return fid.rpartition("-")[2]


def read_frames(stream: Readable, app: str | None = None) -> Iterator[Block]:
    """The Block of each frame in order.

    Of a tail frame, only `app`'s part, if the frame has one (the others are not decompressed).
    A frame sluice did not announce (a file written before announcements) is decompressed with
    what follows it as one stream, in chunks, with the id None. Raises Damaged on a truncated
    or corrupt stream, after yielding everything before the damage.
    """
    dctx = zstandard.ZstdDecompressor()
    while True:
        head = _read_exactly(stream, _HEAD.size)
        if not head:
            return
        magic, size = _HEAD.unpack(head)
        if magic == MAGIC:
            payload = _read_exactly(stream, size)
            (length,) = _LENGTH.unpack_from(payload)
            yield Block(payload[_LENGTH.size:].decode(), _decompress(dctx, _read_exactly(stream, length)))
        elif magic == TAIL_MAGIC:
            length, entries, bid, hour = _tail_payload(_read_exactly(stream, size))
            frame = _read_exactly(stream, length)
            if app is None or all(e.app != app for e in entries):
                continue
            data, at = _decompress(dctx, frame), 0
            for entry in entries:
                if entry.app == app:
                    yield Block(schema.piece_id(bid, schema.app_hour(app, hour)), data[at:at + entry.size])
                at += entry.size
        elif magic == GATHERED_MAGIC:
            payload = _read_exactly(stream, size)
            length, n = _COUNT.unpack_from(payload)
            sources = tuple((raw.hex(), nbytes) for raw, nbytes in
                            (_SOURCE.unpack_from(payload, _COUNT.size + i * _SOURCE.size) for i in range(n)))
            yield Block(None, _decompress(dctx, _read_exactly(stream, length)), sources)
        elif magic in _SKIPPABLE:
            _read_exactly(stream, size)
        else:
            yield from (Block(None, chunk) for chunk in _stream_rest(dctx, head, stream))
            return


def tail_frames(stream: Readable) -> Iterator[tuple[list[TailEntry], bytes]]:
    """(entries, decompressed data) of each frame of a tail file. Damaged if the file holds
    anything but tail frames, or is cut short."""
    dctx = zstandard.ZstdDecompressor()
    while head := _read_exactly(stream, _HEAD.size):
        magic, size = _HEAD.unpack(head)
        if magic != TAIL_MAGIC:
            raise Damaged(f"a frame of kind {magic:#x} in a tail file")
        length, entries, _, _ = _tail_payload(_read_exactly(stream, size))
        data = _decompress(dctx, _read_exactly(stream, length))
        if sum(e.size for e in entries) != len(data):
            raise Damaged("a tail frame's announcement does not add up to its data")
        yield entries, data


def _tail_payload(payload: bytes) -> tuple[int, list[TailEntry], str, str]:
    """(frame length, entries, batch id, hour) of a tail announcement."""
    try:
        length, n = _COUNT.unpack_from(payload)
        entries, at = _unpack_entries(payload, _COUNT.size, n)
        bid, _, hour = payload[at:].decode().rpartition("|")
    except (struct.error, UnicodeDecodeError) as exc:
        raise Damaged(f"a damaged tail announcement: {exc}") from None
    return length, entries, bid, hour


def _decompress(dctx: zstandard.ZstdDecompressor, frame: bytes) -> bytes:
    try:
        return dctx.decompress(frame)
    except zstandard.ZstdError as exc:
        raise Damaged(f"corrupt frame: {exc}") from None


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
