"""Move sealed slot files to the object store: upload, verify, then delete the local copy.

Object names come from the slot file id recorded in Redis, so an upload repeated after a
crash overwrites the same object instead of adding a second copy.

An app-hour keeps at most `slots_per_app` objects however late its records come: a sealed file
of an app-hour that has them all is merged into the smallest (zstd frames concatenate), written
as that object's next generation, and only then is the old generation deleted (see
sluice.archive.store.live_keys). How each file is archived is recorded in Redis before anything is
written (sluice.slots.sealed), so a repeat after a crash finishes the same plan instead of deciding
anew.

Every object ends with the index of its frames (sluice.formats.frames). For a new object it is written
past the sealed file's committed size, where no reader of the spool looks, and is the same bytes
however often that runs; a merge drops the old object's index and writes one of both. An object
counts as stored whole once its content before the index is what the plan says it holds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import BinaryIO, Iterator

import redis
from redis.exceptions import LockError, RedisError

from sluice.archive.store import (
    Store,
    content_length,
    hour_prefix,
    is_tail_object,
    live_keys,
    next_generation,
    object_key,
)
from sluice.core import schema
from sluice.core.errors import Damaged, UploadFailed
from sluice.core.settings import Settings
from sluice.formats.frames import index, index_entries
from sluice.formats.records import hour_start
from sluice.formats.spool import FileRange, SealedFile, Spool, remove_empty_dirs
from sluice.handover.batch_files import BatchFiles
from sluice.slots.sealed import SealedRegistry, batch_in_flight

log = logging.getLogger(__name__)

# An upload holds its app-hour's lock with this lease, renewed while it works: a worker killed
# mid-upload holds the app-hour up for this long at most.
APP_HOUR_LEASE_SECONDS = 30.0


def by_app_hour(files: list[SealedFile]) -> dict[tuple[str, str], list[SealedFile]]:
    """Sealed files grouped by their app-hour, in the order given."""
    groups: dict[tuple[str, str], list[SealedFile]] = {}
    for sealed in files:
        groups.setdefault((sealed.app, sealed.hour), []).append(sealed)
    return groups


@contextlib.contextmanager
def app_hour_lease(client: redis.Redis, app: str, hour: str) -> Iterator[bool]:
    """Hold the app-hour's upload lock while the block runs, if nobody else holds it (the block
    gets False then). The lease is renewed by a thread: a worker killed mid-upload holds the
    app-hour up for APP_HOUR_LEASE_SECONDS at most."""
    lock = client.lock(schema.upload_lock(app, hour), timeout=APP_HOUR_LEASE_SECONDS, blocking=False)
    if not lock.acquire():
        yield False
        return
    done = threading.Event()

    def renew() -> None:
        while not done.wait(APP_HOUR_LEASE_SECONDS / 3):
            try:
                lock.reacquire()
            except (LockError, RedisError) as exc:
                log.warning("upload of %s %s: its app-hour lease could not be renewed (%s); another "
                            "upload may start once it lapses (uploads are idempotent)", app, hour, exc)
                return

    renewer = threading.Thread(target=renew, name="upload-lease", daemon=True)
    renewer.start()
    try:
        yield True
    finally:
        done.set()
        renewer.join()
        try:
            lock.release()
        except LockError:
            log.warning("upload of %s %s outlived its app-hour lease; uploads are idempotent", app, hour)


class Uploader:
    """Archives sealed files into one store."""

    def __init__(self, client: redis.Redis, settings: Settings, store: Store) -> None:
        self.r = client
        self.settings = settings
        self.registry = SealedRegistry(client)
        self.spool = Spool(settings.spool_dir)
        self.store = store
        self.slots_per_app = settings.slots_per_app
        self.batch_files = BatchFiles(settings.spool_dir)

    def archive_app_hour(self, files: list[SealedFile]) -> int:
        """Archive these sealed files of one app-hour, except those archived already, unless
        the app-hour is being uploaded right now; how many this call uploaded.

        One upload per app-hour at a time (a Redis lock whose lease a thread renews while the
        upload runs): so never two uploads of one file at once, and two late files of an
        app-hour never pick the same object to merge into. A file that fails is logged and the
        others go on; UploadFailed at the end names it.
        """
        app, hour = files[0].app, files[0].hour
        if app == schema.TAIL_APP:
            raise ValueError("tail files are archived by sluice.archive.tail, one object per app, not as they are")
        archived, failed = 0, []
        with app_hour_lease(self.r, app, hour) as held:
            if not held:
                return 0  # the next sweep sends it again
            for sealed in files:
                if not self.registry.is_sealed(sealed):
                    continue  # archived by an earlier delivery
                try:
                    archived += self._archive(sealed)
                except RedisError:
                    raise
                except Exception as exc:  # noqa: BLE001 - one failure must not hold back the rest
                    log.error("archiving %s failed, will retry: %s", sealed.entry, exc)
                    failed.append(sealed.entry)
                    self.registry.upload_failed()
        if failed:
            raise UploadFailed(f"{len(failed)} of {len(files)} sealed files of {app} {hour} not archived "
                               f"yet, e.g. {failed[0]}")
        return archived

    def _archive(self, sealed: SealedFile) -> int:
        path = self.spool.finish_seal(sealed)  # completes a seal interrupted before its rename
        plan = self.registry.upload_plan(sealed)
        if plan is None and path.exists() and (bid := batch_in_flight(path, sealed.size, self.batch_files)):
            log.info("%s waits for batch %s, still in flight, before its upload", sealed.entry, bid)
            return 0
        if plan is None and not path.exists() and not self._named_in_store(sealed):
            # A file leaves the spool only once stored whole: archived, in writes Redis lost.
            log.warning("%s is gone from the spool with no upload plan: archived already", sealed.entry)
            self.registry.forget(sealed)
            return 0
        plan = plan or self.registry.plan_upload(sealed, self._choose(sealed))
        merge = schema.parse_plan(plan)
        if merge is None:
            source, source_size, key = None, 0, object_key(sealed.app, sealed.hour, sealed.fid)
        else:
            source, source_size = merge
            key = next_generation(source)
        uploaded = 0
        before = 0 if source is None else content_length(self.store, source)  # None: the source is gone
        if not _stored_whole(self.store, key, before, sealed.size):
            if not path.exists():
                raise IOError(f"{key} is neither in the spool nor complete in the store")
            on_disk = path.stat().st_size
            if on_disk < sealed.size:
                raise IOError(f"{path} has {on_disk} bytes, {sealed.size} were committed")
            if source is None:
                _add_index(path, sealed)
                self.store.put(path, key)
            else:
                _merge(self.store, self.spool.root / "merge", source, source_size, before, path, sealed, key)
            uploaded = 1
        if source is not None:
            self.store.delete(source)  # after its successor is complete: readers switch to that
        path.unlink(missing_ok=True)
        remove_empty_dirs(path, levels=2)
        self.registry.forget(sealed)  # last: until here a crash just repeats the plan
        log.info("archived %s (%d bytes)%s", key, sealed.size, f", merged into {source}" if source else "")
        return uploaded

    def _named_in_store(self, sealed: SealedFile) -> bool:
        return object_key(sealed.app, sealed.hour, sealed.fid) in self.store.list(hour_prefix(sealed.app, sealed.hour))

    def _choose(self, sealed: SealedFile) -> str:
        """A new object while the app-hour has fewer than N, else a merge into the smallest."""
        keys = self.store.list(hour_prefix(sealed.app, sealed.hour))
        if object_key(sealed.app, sealed.hour, sealed.fid) in keys:
            return schema.NEW_OBJECT  # uploaded already, before plans were recorded
        live = live_keys(keys)
        for superseded in set(keys) - set(live):
            self.store.delete(superseded)  # left by a merge cut short after writing its successor
        if len(live) < self.slots_per_app:
            return schema.NEW_OBJECT
        busy = {merge[0] for plan in self.registry.planned() if (merge := schema.parse_plan(plan))}
        # Tail objects (sluice.archive.tail) take only lines gathered from tail files.
        sizes = {key: self.store.size(key) for key in live if key not in busy and not is_tail_object(sealed.app, key)}
        if not sizes:
            raise IOError(f"every object of {sealed.app} {sealed.hour} is being merged; next sweep")
        smallest = min(sizes, key=lambda key: sizes[key] or 0)
        return schema.merge_plan(smallest, sizes[smallest] or 0)


def _add_index(path: Path, sealed: SealedFile) -> None:
    """End the sealed file with the index of its committed frames (sluice.formats.frames), past its
    committed size, where no reader of the spool looks; the same bytes however often it runs.
    A file of zstd frames sluice did not announce (written before announcements) gets none:
    readers read such objects whole."""
    trailer = _trailer(path, sealed.size, sealed.hour)
    if not trailer:
        return
    with open(path, "r+b") as fh:
        if os.pread(fh.fileno(), len(trailer) + 1, sealed.size) != trailer:
            fh.truncate(sealed.size)
            os.pwrite(fh.fileno(), trailer, sealed.size)
            os.fsync(fh.fileno())


def _trailer(path: Path, size: int, hour: str) -> bytes:
    """The index of the frames in the first `size` bytes of a file; none (b"") for a file of
    zstd frames sluice did not announce (written before announcements)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return index(index_entries(FileRange(fd, 0, size), int(hour_start(hour) * 1000)))
    except Damaged:
        return b""
    finally:
        os.close(fd)


def _stored_whole(store: Store, key: str, before: int | None, committed: int) -> bool:
    """Whether `key` holds `before` bytes of an earlier object and the `committed` bytes of a
    sealed file, and an index of them. `before` None: the object merged into is gone, which
    happens only once its successor was stored whole."""
    content = content_length(store, key)
    if content is None:
        return False
    return before is None or content == before + committed


def _merge(store: Store, workdir: Path, source: str, source_size: int, before: int | None, path: Path,
           sealed: SealedFile, key: str) -> None:
    """Write the source's frames (its first `before` bytes: all but its index) + the sealed
    file's + an index of both as `key`; the source must still have `source_size` bytes."""
    if before is None:
        raise IOError(f"{source}, planned to merge into, is gone")
    workdir.mkdir(parents=True, exist_ok=True)
    merged = workdir / path.name
    try:
        with open(merged, "wb") as out:
            with store.open(source) as stream:
                shutil.copyfileobj(stream, out, 1024 * 1024)
            if out.tell() != source_size:
                raise IOError(f"{source} has {out.tell()} bytes, {source_size} were planned")
            out.truncate(before)  # its index: the merged object gets one of its own
            out.seek(before)
            with open(path, "rb") as new:
                _copy_exactly(new, out, sealed.size)
        trailer = _trailer(merged, before + sealed.size, sealed.hour)
        with open(merged, "ab") as out:
            out.write(trailer)
            out.flush()
            os.fsync(out.fileno())
        store.put(merged, key)
    finally:
        merged.unlink(missing_ok=True)


def _copy_exactly(src: BinaryIO, dst: BinaryIO, size: int) -> None:
    """The first `size` bytes of a sealed file, a MiB at a time; IOError if it has fewer."""
    left = size
    while left and (chunk := src.read(min(left, 1024 * 1024))):
        dst.write(chunk)
        left -= len(chunk)
    if left:
        raise IOError(f"a sealed file has {size - left} bytes, {size} were committed")
