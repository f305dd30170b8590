"""Batch files in the spool: claim-check payloads (`batches/`) and split pieces (`pieces/`).

Each is written once, whole, then renamed into place and fsynced with its directory, so a
reader never sees a half-written file and a power loss never loses one that Redis refers to.
Redis (sluice.handover.batches) holds only where each piece lies.
"""

from __future__ import annotations

import logging
import mmap
import os
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from sluice.formats.spool import durable_mkdir, fsync_dir

log = logging.getLogger(__name__)

# What batch payloads and pieces are handled as: bytes, views of fetched bytes, mapped files.
BytesLike = bytes | memoryview | mmap.mmap


class BatchFiles:
    """Paths and I/O of the batch files under one spool directory."""

    def __init__(self, spool_dir: Path) -> None:
        self.root = spool_dir

    def payload_path(self, bid: str) -> Path:
        return self.root / "batches" / f"{bid}.kafka"

    def pieces_path(self, bid: str, token: str) -> Path:
        return self.root / "pieces" / f"{bid}.{token}"

    def write_payload(self, bid: str, payload: Sequence[BytesLike]) -> None:
        write_durably(self.payload_path(bid), payload)

    def payload_size(self, bid: str) -> int:
        """The bytes of the batch's payload file; 0 if it has none (its payload lies in Redis)."""
        try:
            return self.payload_path(bid).stat().st_size
        except FileNotFoundError:
            return 0

    def map_payload(self, bid: str) -> BytesLike:
        """The payload file, mapped rather than read: the split decodes it in place."""
        with open(self.payload_path(bid), "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return b""
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    def drop_payload(self, bid: str) -> None:
        self.payload_path(bid).unlink(missing_ok=True)

    def read_pieces(self, bid: str, spans: list[tuple[str, int, int] | None]) -> list[bytes | None]:
        """The bytes of each (token, offset, length) span of the batch's pieces files."""
        out: list[bytes | None] = []
        files: dict[str, int] = {}
        try:
            for span in spans:
                if span is None:
                    out.append(None)
                    continue
                token, offset, length = span
                if token not in files:
                    files[token] = os.open(self.pieces_path(bid, token), os.O_RDONLY)
                data = os.pread(files[token], length, offset)
                if len(data) != length:
                    raise IOError(f"pieces file of {bid} is shorter than its index says")
                out.append(data)
        finally:
            for fd in files.values():
                os.close(fd)
        return out

    def drop_pieces(self, bid: str) -> None:
        """Remove the pieces files of a batch whose every piece is appended."""
        for path in (self.root / "pieces").glob(f"{bid}.*"):
            path.unlink(missing_ok=True)

    def drop_orphans(self, older_than: float, in_flight: Callable[[str], bool]) -> int:
        """Payload and pieces files older than `older_than` seconds of batches not in flight (a
        worker died between the last commit and the cleanup, a split died before its commit, a
        bridge between writing a payload and handing it over); how many were removed. Only on a
        state checked against the spool (sluice.ops.repair): a Redis that forgot a batch must
        not have its payload removed."""
        removed = 0
        cutoff = time.time() - older_than
        paths = [*(self.root / "pieces").glob("*"), *(self.root / "batches").glob("*.kafka")]
        for path in paths:
            bid = path.name.removesuffix(".kafka") if path.suffix == ".kafka" else path.name.rsplit(".", 1)[0]
            try:
                old = path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if old and not in_flight(bid):
                path.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d orphaned batch files", removed)
        return removed


def write_durably(path: Path, parts: Iterable[BytesLike]) -> None:
    """Write the parts one after the other (not joined first: one copy of every byte fewer),
    then rename into place, fsyncing the file and its directory."""
    durable_mkdir(path.parent)
    # A name of its own: two deliveries of one batch may write at once, and must not share one.
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.writelines(parts)
            fh.flush()
            os.fsync(fh.fileno())
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # a full disk must not keep what it could not finish
        raise
    fsync_dir(path.parent)
