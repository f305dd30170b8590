"""The long tail: quiet apps archived as one object per app and hour, from shared tail files.

With thousands of apps most pieces of a batch are a few hundred bytes. Each as a frame of its own,
in a file of its own, costs a zstd frame that compresses poorly without context, a file write
and a commit entry per app and batch, and then a seal, an upload and an object per app-hour file.
So a piece under `tail_piece_bytes` goes, with the other small pieces of its batch and hour, into
one *tail frame* (sluice.handover.split, sluice.formats.frames) appended to a slot of the pseudo-app
`schema.TAIL_APP` of that hour, under the same leases, locks and commit as any slot file: it is
fetchable as soon as it is committed (`sluice fetch` reads tail files too).

Once sealed, the tail files of an hour are archived together: every frame is decompressed, each
app's bytes are gathered in file order and compressed as one frame (announced with which bytes
came from which tail file, so a fetch that read some of them from the spool prints them once), and
written as one object per app, all at once (`Store.put_objects`). Tail files sealed later (late
records, a full tail file) are archived the same way, but an app's lines then join its tail object
of that hour while it is small (one object per quiet app-hour), as the object's next generation
holding one frame of both. Crash-safe and idempotent:

1. The set of tail files is recorded in Redis first (`schema.TAIL_PLAN`), so a repeat after a
   crash archives the same set. In an hour's first archive the object keys are named by the
   set's first fid and their bytes are the same again (zstd is deterministic): writing them
   again only overwrites them. In a later one, an object whose frame names a file of the set
   shows that app was stored already.
2. An object a merge replaces is deleted only after its successor is stored (readers take the
   newest generation), and the tail files only after every object is stored; a repeat that
   finds a tail file gone knows the objects were all stored, and only finishes the rest.
3. Last, one script drops the files from the registry and the plan, counts the hour's archive
   rounds (`schema.TAIL_ROUNDS`), and counts what was archived.

A tail file that cannot be read (damaged) holds its hour's archive back: the upload fails loudly
each sweep (`sluice_uploads_total{result="failed"}`), and the file stays in the spool until an
operator looks at it; nothing is deleted.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import NamedTuple

import redis
import zstandard

from sluice.archive.store import (
    TAIL_OBJECT,
    Store,
    hour_prefix,
    is_tail_object,
    live_keys,
    next_generation,
    object_key,
    open_newest,
)
from sluice.archive.uploader import app_hour_lease
from sluice.core import schema, scripts
from sluice.core.settings import Settings
from sluice.formats.frames import (
    IndexEntry,
    Meta,
    Unit,
    announce_gathered,
    decode,
    index,
    tail_file_id,
    tail_frames,
    units,
)
from sluice.formats.spool import SealedFile, Spool, remove_empty_dirs
from sluice.handover.batch_files import BatchFiles
from sluice.slots.sealed import batch_in_flight

log = logging.getLogger(__name__)


class TailArchiver:
    """Archives the sealed tail files of an hour as one object per app."""

    def __init__(self, client: redis.Redis, settings: Settings, store: Store) -> None:
        self.r = client
        self.spool = Spool(settings.spool_dir)
        self.store = store
        self.level = settings.zstd_level
        self.n = settings.slots_per_app
        # A tail object under this size takes an app's later tail records (one object per
        # quiet app-hour); a bigger one is left as it is while the app-hour has fewer than N.
        self.small_bytes = settings.seal_size_bytes // 16
        self._forget = client.register_script(scripts.FORGET_TAIL)
        self.batch_files = BatchFiles(settings.spool_dir)

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
        now, but for those holding a piece of a batch still in flight (they wait for it, see
        sluice.slots.sealed.batch_in_flight). Files of the recorded set archived already (gone
        from SEALED) leave it."""
        if not self.r.hexists(schema.TAIL_PLAN, hour):
            ready = [f for f in files if not ((path := self.spool.sealed_path(f.app, f.hour, f.fid)).exists()
                                               and batch_in_flight(path, f.size, self.batch_files))]
            if not ready:
                return []
            self.r.hsetnx(schema.TAIL_PLAN, hour, ",".join(sorted(f.fid for f in ready)))
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
            gathered = self._gather(plan, paths)
            first_round = not int(self.r.hget(schema.TAIL_ROUNDS, hour) or 0)
            objects: list[tuple[str, bytes]] = []
            superseded: list[str] = []
            for app in sorted(gathered):
                lines = gathered[app]
                placed = self._place(app, hour, plan, lines, first_round)
                if placed is None:
                    continue  # an earlier try of this plan merged it already
                key, payload, old = placed
                objects.append((key, payload))
                superseded += old
                counts += [app, lines.meta.records, len(payload)]
            self.store.put_objects(objects)
            for key in superseded:
                self.store.delete(key)  # after its successor is stored: readers switch to that
            written = len(objects)
        else:  # an earlier try stored every object before it deleted the first file
            log.info("tail files of %s: an earlier try archived them; finishing", hour)
        for path in paths:
            path.unlink(missing_ok=True)
        if paths:
            remove_empty_dirs(paths[0], levels=2)
        self._forget(keys=[schema.SEALED, schema.TAIL_PLAN, schema.SEALED_RECORDS, schema.PENDING_OLDEST,
                           schema.ARCHIVED_RECORDS, schema.ARCHIVED_BYTES, schema.COUNTERS, schema.TAIL_ROUNDS],
                     args=[hour, len(plan), *(sealed.entry for sealed in plan), *counts])
        log.info("archived %d tail files of %s as %d objects", len(plan), hour, written)
        return written

    def _gather(self, plan: list[SealedFile], paths: list[Path]) -> dict[str, _Lines]:
        """Each app's lines from these tail files, in order."""
        parts: dict[str, list[bytes]] = collections.defaultdict(list)
        sources: dict[str, list[tuple[str, int]]] = collections.defaultdict(list)
        records: collections.Counter[str] = collections.Counter()
        spans: dict[str, tuple[int, int]] = {}
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
                        lo, hi = spans.get(entry.app, (entry.min_ms, entry.max_ms))
                        spans[entry.app] = (min(lo, entry.min_ms), max(hi, entry.max_ms))
                        at += entry.size
            for app, nbytes in from_file.items():
                sources[app].append((sealed.fid, nbytes))
        out = {}
        for app, chunks in parts.items():
            data = b"".join(chunks)
            out[app] = _Lines(data, sources[app], Meta(len(data), records[app], *spans[app]))
        return out

    def _place(self, app: str, hour: str, plan: list[SealedFile], lines: _Lines,
               first_round: bool) -> tuple[str, bytes, list[str]] | None:
        """(key, bytes, keys it supersedes) of the object an app's gathered lines go to, or None
        if an earlier try of this plan stored it already.

        The hour's first archive makes a new object per app. A later one (late records) merges
        into the app's smallest tail object of the hour while that is small, or once the app-hour
        has N objects, into a next generation (sluice.archive.store) holding one frame of both; otherwise
        it starts a new one. Before any of that, an object whose frame names a file of this plan
        means this plan was stored already."""
        key = object_key(app, hour, TAIL_OBJECT + plan[0].fid)
        if first_round:
            return key, self._object(lines), []
        listed = self.store.list(hour_prefix(app, hour))
        live = live_keys(listed)
        stale = sorted(set(listed) - set(live))  # left by a merge cut short after its successor was stored
        planned = {tail_file_id(sealed.fid) for sealed in plan}
        tails: dict[str, list[Unit]] = {}  # the app's tail objects' frames, not decompressed
        for other in live:
            if not is_tail_object(app, other):
                continue
            with open_newest(self.store, hour_prefix(app, hour), other) as stream:
                tails[other] = list(units(stream))
            if planned & {tail for unit in tails[other] for tail, _ in unit.sources}:
                for old in stale:
                    self.store.delete(old)
                return None
        sizes = {other: self.store.size(other) or 0 for other in tails}
        smallest = min(sizes, key=lambda other: sizes[other], default=None)
        if smallest is None or (sizes[smallest] >= self.small_bytes and len(live) < self.n):
            return key, self._object(lines), stale
        before = self._lines(tails[smallest], lines.meta)  # only the one merged is decompressed
        data = before.data + lines.data
        both = _Lines(data, before.sources + lines.sources,
                      Meta(len(data), before.meta.records + lines.meta.records,
                           min(before.meta.min_ms, lines.meta.min_ms), max(before.meta.max_ms, lines.meta.max_ms)))
        return next_generation(smallest), self._object(both), stale + [smallest]

    @staticmethod
    def _lines(found: list[Unit], default: Meta) -> _Lines:
        """The lines of an app's tail object (its frames), their sources and meta; a span the
        frames do not announce is `default`'s."""
        dctx = zstandard.ZstdDecompressor()
        data = b"".join(block.data for unit in found for block in decode(unit, dctx))
        metas = [unit.meta for unit in found if unit.meta is not None]
        return _Lines(data, [source for unit in found for source in unit.sources],
                      Meta(len(data), data.count(b"\n"), min((m.min_ms for m in metas), default=default.min_ms),
                           max((m.max_ms for m in metas), default=default.max_ms)))

    def _object(self, lines: _Lines) -> bytes:
        """An object of one gathered frame, and its index."""
        cctx = zstandard.ZstdCompressor(level=self.level, write_checksum=True)  # one per call: not thread-safe
        frame = announce_gathered(lines.sources, cctx.compress(lines.data), lines.meta)
        return frame + index([IndexEntry(0, len(frame), lines.meta)])


class _Lines(NamedTuple):
    """An app's lines gathered from tail files: which bytes came from which, and their meta."""

    data: bytes
    sources: list[tuple[str, int]]
    meta: Meta
