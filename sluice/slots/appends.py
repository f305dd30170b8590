"""Fenced appends: at most N writers per app-hour, each appending whole zstd frames to the slot
file it holds the lease of (sluice.slots.slot_leases).

A zstd stream may be a concatenation of frames, so a slot file grows by whole frames. The
committed size lives in Redis and moves only in the script that also retires the batch piece
and checks the writer's lease token, so whatever lies past it (a torn write of a killed
worker, or the write of a duplicate task that lost the race) is cut off before the next append
or when the slot is sealed. The file itself is changed only under its kernel lock, after the
lease has been checked again (see sluice.formats.spool): a writer frozen past its lease can never cut
or overwrite bytes that someone else committed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import time
import uuid
from dataclasses import dataclass

import redis

from sluice.core import schema, scripts
from sluice.core.errors import FileBusy, LockLost, SlotsBusy
from sluice.core.settings import Settings
from sluice.formats.records import hour_of
from sluice.formats.spool import SealedFile, Spool, cut_back, locked_file, make_durable, write_at
from sluice.handover.batch_files import BatchFiles
from sluice.slots.slot_leases import SlotLeases

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Frame:
    """One compressed piece of a batch, ready to append to a slot of (app, hour): an app-hour,
    or the tail piece of an hour (app `schema.TAIL_APP`) holding the small ones of many apps."""

    app: str
    hour: str
    data: bytes
    records: int


@dataclass(frozen=True)
class _Held:
    frame: Frame
    sid: str
    fid: str
    size: int


class Appender:
    """Appends frames to slot files, each under its slot's lease and its file's kernel lock."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self.spool = Spool(settings.spool_dir)
        self.leases = SlotLeases(client, settings)
        self._batch_files = BatchFiles(settings.spool_dir)
        self._acquire_script = client.register_script(scripts.ACQUIRE)
        self._verify = client.register_script(scripts.VERIFY)
        self._commit = client.register_script(scripts.COMMIT)

    def append(self, bid: str, app: str, hour: str, frame: bytes, nrecords: int) -> bool:
        """Append one frame for batch piece (bid, app, hour) exactly once."""
        return self.append_many(bid, [Frame(app, hour, frame, nrecords)]) == 1

    def append_many(self, bid: str, frames: list[Frame]) -> int:
        """Append each frame of batch `bid` exactly once; returns how many this call appended.

        Pieces already appended by an earlier delivery are skipped. Four round trips to Redis
        for the whole bundle, whatever its size: acquire, check the leases under the file
        locks, (write each file, then make them durable at once), commit, release.
        """
        appended = 0
        todo = frames
        frozen: set[str] = set()  # slots whose file a frozen writer still holds
        deadline = time.monotonic() + self.settings.lock_wait_seconds
        while todo:
            token = uuid.uuid4().hex
            held = self._acquire(todo, token, frozen)
            claimed = [h for h in held if h is not None]
            done, busy = self._append_claimed(bid, token, claimed, frozen) if claimed else (0, [])
            appended += done
            todo = [f for f, h in zip(todo, held) if h is None] + busy
            if todo:
                if time.monotonic() > deadline:
                    raise SlotsBusy(f"all {self.settings.slots_per_app} slots of "
                                    f"{todo[0].app} {todo[0].hour} are busy")
                time.sleep(random.uniform(0.01, 0.05))
        return appended

    def _acquire(self, frames: list[Frame], token: str, skip: set[str]) -> list[_Held | None]:
        """One round trip: the lowest free slot of each frame's app-hour, or None if all busy.

        Lowest first, so a quiet app writes one file per hour, not N. Slots in `skip` are
        passed over.
        """
        n = self.settings.slots_per_app
        args: list[object] = [token, self.leases.lease_ms, n, schema.SLOT_LOCK_PREFIX, schema.SLOT_STATE_PREFIX]
        for f in frames:
            args += [schema.app_hour(f.app, f.hour), schema.new_fid(f.hour, uuid.uuid4().hex[:16]),
                     "".join("1" if schema.slot_id(f.app, f.hour, k) in skip else "0" for k in range(n))
                     if skip else ""]
        held: list[_Held | None] = []
        for f, got in zip(frames, self._acquire_script(keys=[schema.SLOTS], args=args)):
            if got[0] < 0:
                held.append(None)
            else:
                held.append(_Held(f, schema.slot_id(f.app, f.hour, got[0]), got[1].decode(), int(got[2])))
        return held

    def _append_claimed(self, bid: str, token: str, claimed: list[_Held],
                        frozen: set[str]) -> tuple[int, list[Frame]]:
        """Write and commit the frames of the slots we hold; (appended, frames to place again)."""
        busy: list[Frame] = []
        held = {h.sid for h in claimed}  # the locks still ours to release: the commit releases most
        with contextlib.ExitStack() as stack:
            # Registered first, so it runs last: after the file locks are released.
            stack.callback(lambda: self.leases.unlock(sorted(held), token))
            files: list[tuple[_Held, int]] = []
            for h in claimed:
                path = self.spool.open_path(h.frame.app, h.frame.hour, h.fid)
                try:
                    fd = stack.enter_context(locked_file(path, create=h.size == 0))
                except FileBusy:
                    log.warning("slot %s: its file is locked by another process (frozen or dying); "
                                "writing %s elsewhere", h.sid, bid)
                    frozen.add(h.sid)
                    busy.append(h.frame)
                    continue
                except FileNotFoundError:
                    raise LockLost(f"slot {h.sid} was sealed while we waited for it") from None
                files.append((h, fd))
            if not files:
                return 0, busy
            sizes = self._committed_sizes(token, files)
            ends = self._write_all(files, sizes)
            return self._commit_all(bid, token, files, sizes, ends, held), busy

    def _committed_sizes(self, token: str, files: list[tuple[_Held, int]]) -> list[int]:
        """Under the file locks: each slot is still ours, and its committed size right now.

        Only from here on can nobody else change these files, so this, not what `_acquire`
        saw, is what a writer may cut back to.
        """
        args: list[object] = [token, schema.SLOT_LOCK_PREFIX, schema.SLOT_STATE_PREFIX]
        for h, _ in files:
            args += [h.sid, h.fid]
        sizes = self._verify(args=args)
        for (h, fd), size in zip(files, sizes):
            if size == -2:
                self._drop_orphan(fd, h)
            if size < 0:
                raise LockLost(f"lease on slot {h.sid} expired before its file was locked")
        return sizes

    def _drop_orphan(self, fd: int, h: _Held) -> None:
        """A frozen writer that wakes after its slot was sealed may have created an empty file
        again; the fid is retired for good, so nobody else can be using that path."""
        if os.fstat(fd).st_size == 0:
            self.spool.open_path(h.frame.app, h.frame.hour, h.fid).unlink(missing_ok=True)

    @staticmethod
    def _write_all(files: list[tuple[_Held, int]], sizes: list[int]) -> list[int]:
        """Write every frame at its slot's committed size and make them all durable; on a
        failure, undo them all."""
        ends: list[int] = []
        try:
            for (h, fd), size in zip(files, sizes):
                ends.append(write_at(fd, h.frame.data, size))
            make_durable([fd for _, fd in files])
        except OSError:
            for (_, fd), size in zip(files, sizes):
                cut_back(fd, size)
            raise
        return ends

    def _commit_all(self, bid: str, token: str, files: list[tuple[_Held, int]],
                    sizes: list[int], ends: list[int], held: set[str]) -> int:
        """Commit the appended frames; the slots committed leave `held` (the script released them)."""
        now = time.time()
        keys = [schema.batch_pending(bid), schema.batch_groups(bid), schema.batch_state(bid),
                schema.INFLIGHT, schema.COUNTERS, schema.SEALED, schema.SLOTS,
                schema.INFLIGHT_BYTES, schema.BATCH_BYTES, schema.INFLIGHT_OLDEST, schema.PENDING_OLDEST,
                schema.SEALED_RECORDS, schema.hourly_records(hour_of(now))]
        args: list[object] = [token, bid, self.settings.seal_size_bytes,
                              schema.SLOT_LOCK_PREFIX, schema.SLOT_STATE_PREFIX, schema.HOURLY_TTL_SECONDS,
                              schema.Counter.RECORDS_APPENDED.value]
        for (h, _), end in zip(files, ends):
            args += [h.sid, h.fid, end, h.frame.records]
        *results, finished = self._commit(keys=keys, args=args)
        held.difference_update(h.sid for (h, _), result in zip(files, results) if result > 0)
        if finished:
            self._batch_files.drop_pieces(bid)
            self._batch_files.drop_payload(bid)
        lost = []
        for (h, fd), size, end, result in zip(files, sizes, ends, results):
            if result == 0:  # a duplicate delivery: take our bytes back off the tail
                cut_back(fd, size)
            elif result == -1:  # our lease ran out: only our own bytes are past `size`
                cut_back(fd, size)
                lost.append(h.sid)
            elif result == 2:  # sealed by size; nobody appends to this fid any more
                self.spool.finish_seal(SealedFile(h.frame.app, h.frame.hour, h.fid, end), fd)
        if lost:
            raise LockLost(f"lease on slots {lost} expired during an append")
        return sum(1 for r in results if r > 0)
