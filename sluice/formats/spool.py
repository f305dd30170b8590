"""The spool directory: open slot files, sealed ones awaiting upload, and how they are changed.

Every change to a slot file (an append, cutting a torn tail, the seal's cut and rename) happens
under an exclusive kernel lock on that file (`locked_file`). A Redis lease cannot fence a file
on its own: a writer frozen past its lease (SIGSTOP, `docker pause`, a VM pause) wakes up
believing it still owns the slot. The kernel keeps a frozen process's file lock, so nobody can
touch the file until that writer resumes or dies, and once it holds the lock a writer re-reads
from Redis whether its lease still stands and what the committed size is at that moment.

On NFS, Linux maps flock to POSIX byte-range locks, which the server holds for a frozen client
until its lease with the server runs out, after which the client's I/O on that file fails
(NFSv4 lost-lock handling). POSIX locks are per process there, so one process must not write
one slot file from two threads: compress runs in prefork workers, one task per process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from sluice.core import schema
from sluice.core.errors import FileBusy, SpoolDamaged

log = logging.getLogger(__name__)
# A writer takes a slot's file lock only while it holds the slot's Redis lease, so the lock is
# found taken only in the moment a committing writer has released its lease and not yet closed
# the file, or when its holder is frozen, cut off or dying: wait out the first, and pass over the
# second at once (another of the app-hour's slots takes the frame).
FILE_LOCK_WAIT_SECONDS = 0.05


def _syncfs_reports_errors() -> bool:
    """syncfs(2) returns writeback errors since Linux 5.8; before that it always returned 0."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        major, minor = (int(part) for part in os.uname().release.split(".")[:2])
    except ValueError:
        return False
    return (major, minor) >= (5, 8)


_libc = ctypes.CDLL(None, use_errno=True) if _syncfs_reports_errors() else None


@dataclass(frozen=True)
class SealedFile:
    """A slot file that takes no more appends; `size` bytes of it are committed."""

    app: str
    hour: str
    fid: str
    size: int

    @property
    def entry(self) -> str:
        return schema.sealed_entry(self.app, self.hour, self.fid)

    @classmethod
    def from_entry(cls, entry: str, size: int) -> "SealedFile":
        return cls(*schema.parse_sealed_entry(entry), size)


@contextlib.contextmanager
def locked_file(path: Path, create: bool = False,
                wait: float = FILE_LOCK_WAIT_SECONDS) -> Iterator[int]:
    """A read-write descriptor of `path` under an exclusive flock, released on exit.

    FileNotFoundError if the path is gone or was renamed while we waited for the lock (a seal
    moved it), so the descriptor always belongs to the file now at `path`. A file created here
    is durable, name and all, once `make_durable` has run on it.
    """
    fd = _open(path, create)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise FileBusy(f"{path} is locked by another writer") from None
                time.sleep(0.005)
        if os.stat(path).st_ino != os.fstat(fd).st_ino:
            raise FileNotFoundError(errno.ENOENT, "moved while waiting for its lock", str(path))
        yield fd
    finally:
        os.close(fd)


def _open(path: Path, create: bool) -> int:
    if not create:
        return os.open(path, os.O_RDWR)
    for attempt in range(3):  # a seal may remove the empty hour directory between the two calls
        if _libc is None:
            durable_mkdir(path.parent)
        else:  # make_durable's syncfs makes the new names durable with the bytes written after them
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:
            if attempt == 2:
                raise
            continue
        if _libc is None:
            fsync_dir(path.parent)  # the new name survives a power loss, like the bytes after it
        return fd
    raise AssertionError("unreachable")


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory (a new or renamed file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_mkdir(path: Path) -> None:
    """mkdir -p, each directory it creates fsynced into its parent."""
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        fsync_dir(directory.parent)


def write_at(fd: int, data: bytes, at: int) -> int:
    """Write `data` at offset `at` (cutting whatever lies past it first); the new size. Not yet
    durable: the caller makes its files durable together (`make_durable`) before committing.

    Loops over short writes; a write that cannot complete (ENOSPC, EIO) is undone and raised,
    so a slot file never holds part of a frame that someone could commit.
    """
    on_disk = os.fstat(fd).st_size
    if on_disk < at:
        raise SpoolDamaged(f"slot file has {on_disk} bytes, {at} were committed")
    if on_disk > at:
        os.ftruncate(fd, at)  # a torn tail of a writer that died before committing
    view, pos = memoryview(data), at
    try:
        while view:
            n = os.pwrite(fd, view, pos)
            if n == 0:
                raise OSError(errno.ENOSPC, "no progress writing the slot file")
            view, pos = view[n:], pos + n
    except OSError:
        cut_back(fd, at)
        raise
    return pos


def make_durable(fds: list[int]) -> None:
    """What was written to these files survives a power loss once this returns.

    A bundle appends to dozens of slot files, and an fsync of each costs a journal commit each
    (BENCHMARKS.md). So where the kernel reports writeback errors from it, one syncfs(2) per
    filesystem flushes them all, and the names of files and directories `locked_file` created
    with them; elsewhere each file is fsynced (and `locked_file` fsynced the new names already).
    """
    if _libc is None:
        for fd in fds:
            os.fsync(fd)
        return
    devices: dict[int, int] = {}
    for fd in fds:
        devices.setdefault(os.fstat(fd).st_dev, fd)
    for fd in devices.values():
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")


def can_sync_filesystem() -> bool:
    """Whether `sync_filesystem` works here: syncfs(2) reports writeback errors (Linux 5.8+)."""
    return _libc is not None


def sync_filesystem(path: Path) -> None:
    """Flush every file and name written to the filesystem of `path` with one syncfs(2). Only
    where `can_sync_filesystem()`; elsewhere the caller fsyncs each file and directory."""
    if _libc is None:
        raise OSError(errno.ENOSYS, "syncfs does not report writeback errors on this kernel")
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"syncfs: {os.strerror(err)}")
    finally:
        os.close(fd)


class FileRange:
    """Bytes [start, end) of an open descriptor, as a stream: a spool file up to the size
    committed for it, whatever lies past that (a torn write, an index)."""

    def __init__(self, fd: int, start: int, end: int) -> None:
        self.fd, self.pos, self.end = fd, start, end

    def read(self, n: int = -1) -> bytes:
        n = self.end - self.pos if n < 0 else min(n, self.end - self.pos)
        data = os.pread(self.fd, n, self.pos) if n > 0 else b""
        self.pos += len(data)
        return data


def cut_back(fd: int, size: int) -> None:
    """Take uncommitted bytes back off a file we hold the lock of; shrinking needs no space.

    Best effort: what lies past the committed size is never read and is cut again before the
    next append or at the seal, so a failure here (a dying disk) is logged, not raised over the
    error that led here."""
    try:
        os.ftruncate(fd, size)
    except OSError as exc:
        log.warning("could not cut a slot file back to its committed %d bytes (%s); the next "
                    "append or the seal cuts it", size, exc)


class Spool:
    """Paths in the spool directory: open slot files and sealed ones awaiting upload."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open_path(self, app: str, hour: str, fid: str) -> Path:
        return self.root / "open" / app / hour / f"{fid}.jsonl.zst"

    def sealed_path(self, app: str, hour: str, fid: str) -> Path:
        return self.root / "sealed" / app / hour / f"{fid}.jsonl.zst"

    def finish_seal(self, sealed: SealedFile, fd: int | None = None) -> Path:
        """Cut the open file to its committed size and move it aside; idempotent.

        `fd` is the caller's locked descriptor of the open file, if it holds one; otherwise the
        file is locked here (FileBusy while a frozen writer holds it).
        """
        src = self.open_path(sealed.app, sealed.hour, sealed.fid)
        dst = self.sealed_path(sealed.app, sealed.hour, sealed.fid)
        if fd is None:
            try:
                with locked_file(src) as own:
                    return self.finish_seal(sealed, own)
            except FileNotFoundError:
                return dst  # moved already
        if os.fstat(fd).st_size < sealed.size:
            raise SpoolDamaged(f"{src} is shorter than its committed {sealed.size} bytes")
        os.ftruncate(fd, sealed.size)
        os.fsync(fd)
        durable_mkdir(dst.parent)
        src.replace(dst)
        fsync_dir(dst.parent)
        remove_empty_dirs(src, levels=2)  # app/hour dirs of the open tree
        return dst


def remove_empty_dirs(path: Path, levels: int) -> None:
    """Remove the parent directories of `path` that are now empty, up to `levels` of them."""
    for parent in list(path.parents)[:levels]:
        try:
            parent.rmdir()
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                log.warning("could not remove the empty directory %s: %s", parent, exc)
            return
