"""The long tail: quiet apps archived as one object per app and hour, from shared tail files.

With thousands of apps most pieces of a batch are a few hundred bytes. Each as a frame of its own,
in a file of its own, costs a zstd frame that compresses poorly without context, a file write
and a commit entry per app and batch, and then a seal, an upload and an object per app-hour file.
So a piece under `tail_piece_bytes` goes, with the other small pieces of its batch and hour, into
one *tail frame* (sluice.stages, sluice.frames) appended to a slot of the pseudo-app
`schema.TAIL_APP` of that hour, under the same leases, locks and commit as any slot file: it is
fetchable as soon as it is committed (`sluice fetch` reads tail files too).

Once sealed, the tail files of an hour are archived together: every frame is decompressed, each
app's bytes are gathered in file order and compressed as one frame (announced with which bytes
came from which tail file, so a fetch that read some of them from the spool prints them once), and
written as one object per app, all at once (`Store.put_objects`). Crash-safe and idempotent:

1. The set of tail files is recorded in Redis first (`schema.TAIL_PLAN`), so a repeat after a
   crash archives the same set, into the same object keys (named by the set's first fid), with
   the same bytes (zstd is deterministic): writing them again only overwrites them.
2. The tail files are deleted only after every object is stored; a repeat that finds one gone
   knows the objects were all stored, and only finishes the rest.
3. Last, one script drops the files from the registry and the plan, and counts what was archived.

A tail file that cannot be read (damaged) holds its hour's archive back: the upload fails loudly
each sweep (`sluice_uploads_total{result="failed"}`), and the file stays in the spool until an
operator looks at it; nothing is deleted.
"""

from __future__ import annotations

import collections
import logging

import redis
import zstandard

from sluice import schema, scripts
from sluice.frames import announce_gathered, tail_frames
from sluice.settings import Settings
from sluice.spool import SealedFile, Spool, remove_empty_dirs
from sluice.store import Store, object_key
from sluice.uploader import app_hour_lease

log = logging.getLogger(__name__)


class TailArchiver:
    """Archives the sealed tail files of an hour as one object per app."""

    def __init__(self, client: redis.Redis, settings: Settings, store: Store) -> None:
        self.r = client
        self.spool = Spool(settings.spool_dir)
        self.store = store
        self.level = settings.zstd_level
        self._forget = client.register_script(scripts.FORGET_TAIL)

    def archive_hour(self, hour: str, files: list[SealedFile]) -> int:
        """Archive these sealed tail files of `hour` (or the set a cut-short earlier try planned);
        how many objects this call wrote. 0 if the hour is being archived right now."""
        with app_hour_lease(self.r, schema.TAIL_APP, hour) as held:
            if not held:
                return 0
            plan = self._plan(hour, files)
            if not plan:
                return 0
            return self._archive(hour, plan)

    def _plan(self, hour: str, files: list[SealedFile]) -> list[SealedFile]:
        """The files to archive together: those recorded by an earlier try, else these, recorded
        now. Files of the recorded set archived already (gone from SEALED) leave it."""
        fids = ",".join(sorted(f.fid for f in files))
        self.r.hsetnx(schema.TAIL_PLAN, hour, fids)
        recorded = (self.r.hget(schema.TAIL_PLAN, hour) or b"").decode().split(",")
        entries = [schema.sealed_entry(schema.TAIL_APP, hour, fid) for fid in recorded if fid]
        sizes = self.r.hmget(schema.SEALED, entries) if entries else []
        plan = [SealedFile.from_entry(entry, int(size)) for entry, size in zip(entries, sizes) if size is not None]
        if not plan:
            self.r.hdel(schema.TAIL_PLAN, hour)
        return plan

    def _archive(self, hour: str, plan: list[SealedFile]) -> int:
        paths = [self.spool.finish_seal(sealed) for sealed in plan]  # completes interrupted seals
        counts: list[object] = []
        written = 0
        if all(path.exists() for path in paths):
            objects, counts = self._gather(hour, plan, paths)
            self.store.put_objects(objects)
            written = len(objects)
        else:  # an earlier try stored every object before it deleted the first file
            log.info("tail files of %s: an earlier try archived them; finishing", hour)
        for path in paths:
            path.unlink(missing_ok=True)
        if paths:
            remove_empty_dirs(paths[0], levels=2)
        self._forget(keys=[schema.SEALED, schema.TAIL_PLAN, schema.SEALED_RECORDS, schema.PENDING_OLDEST,
                           schema.ARCHIVED_RECORDS, schema.ARCHIVED_BYTES, schema.COUNTERS],
                     args=[hour, len(plan), *(sealed.entry for sealed in plan), *counts])
        log.info("archived %d tail files of %s as %d objects", len(plan), hour, written)
        return written

    def _gather(self, hour: str, plan: list[SealedFile],
                paths: list) -> tuple[list[tuple[str, bytes]], list[object]]:
        """(object key, bytes) of each app's object, and (app, records, bytes) of each, flat."""
        parts: dict[str, list[bytes]] = collections.defaultdict(list)
        sources: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
        records: collections.Counter[str] = collections.Counter()
        for sealed, path in zip(plan, paths):
            if path.stat().st_size != sealed.size:
                raise IOError(f"{path} has {path.stat().st_size} bytes, {sealed.size} were committed")
            from_file: collections.Counter[str] = collections.Counter()
            with open(path, "rb") as stream:
                for entries, data in tail_frames(stream):
                    at = 0
                    for entry in entries:
                        parts[entry.app].append(data[at:at + entry.size])
                        from_file[entry.app] += entry.size
                        records[entry.app] += entry.records
                        at += entry.size
            for app, nbytes in from_file.items():
                sources[app].append((sealed.fid, nbytes))
        lineage = plan[0].fid  # the plan is sorted by fid
        cctx = zstandard.ZstdCompressor(level=self.level, write_checksum=True)  # one per call: not thread-safe
        objects: list[tuple[str, bytes]] = []
        counts: list[object] = []
        for app in sorted(parts):
            data = announce_gathered(sources[app], cctx.compress(b"".join(parts[app])))
            objects.append((object_key(app, hour, lineage), data))
            counts += [app, records[app], len(data)]
        return objects, counts
