"""Archive files are zstd frames, each announced by a skippable frame that names it.

Every piece (the lines of one app-hour from one batch) is one zstd frame. Before it sluice
writes a zstd *skippable frame*, which every zstd decoder passes over (the CLI, libzstd, DuckDB),
holding the piece's id and the length of the frame that follows. `sluice fetch` uses them to
read a piece from the spool and again from the store (a seal or an upload moved its file while
the fetch ran) without printing it twice, and to read an object one frame at a time, so its
memory is bounded by a frame, not by the object.
"""

from __future__ import annotations

import struct
from typing import IO, Iterator, Protocol, cast

import zstandard

from sluice.errors import Damaged

__all__ = ["Damaged", "announce", "read_frames"]

MAGIC = 0x184D2A53  # one of the 16 skippable-frame magics of the zstd format
_SKIPPABLE = range(0x184D2A50, 0x184D2A60)
_HEAD = struct.Struct("<II")  # magic, payload size (every zstd skippable frame)
_LENGTH = struct.Struct("<I")  # sluice's payload: the length of the frame that follows, then its id


class Readable(Protocol):
    """What frames are read from: a file, an object being downloaded, a range of a file."""

    def read(self, n: int = -1, /) -> bytes: ...


def announce(piece_id: str, frame: bytes) -> bytes:
    """`frame` preceded by its announcement."""
    ident = piece_id.encode()
    return _HEAD.pack(MAGIC, _LENGTH.size + len(ident)) + _LENGTH.pack(len(frame)) + ident + frame


def read_frames(stream: Readable) -> Iterator[tuple[str | None, bytes]]:
    """(piece id, decompressed piece) of each frame in order.

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
            frame = _read_exactly(stream, length)
            try:
                yield payload[_LENGTH.size:].decode(), dctx.decompress(frame)
            except zstandard.ZstdError as exc:
                raise Damaged(f"corrupt frame: {exc}") from None
        elif magic in _SKIPPABLE:
            _read_exactly(stream, size)
        else:
            yield from ((None, chunk) for chunk in _stream_rest(dctx, head, stream))
            return


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
