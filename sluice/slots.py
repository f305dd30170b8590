"""Slot files: at most N appenders per app-hour, each owning one spool file under a Redis lock.

A zstd stream may be a concatenation of frames, so a slot file grows by whole frames. The
committed size lives in Redis and moves only in the script that also retires the batch piece
and checks the writer's lease token, so whatever lies past it (a torn write of a killed
worker, or the write of a duplicate task that lost the race) is cut off before the next append
or when the slot is sealed. The file itself is changed only under its kernel lock, after the
lease has been checked again (see sluice.spool): a writer frozen past its lease can never cut
or overwrite bytes that someone else committed.
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import uuid
from dataclasses import dataclass

import redis

from sluice import ledger
from sluice.records import hour_start
from sluice.settings import Settings
from sluice.spool import (FileBusy, SealedFile, Spool, SpoolDamaged, cut_back, locked_file, make_durable,
                          write_at)

__all__ = ["Frame", "LockLost", "SealedFile", "Slots", "SlotsBusy", "SpoolDamaged"]

SLOTS_KEY = ledger.PREFIX + "slots"  # set of slot ids "app|hour|k" that have state
SEALED_KEY = ledger.PREFIX + "sealed"  # hash "app|hour|fid" -> committed size, awaiting upload
PLAN_KEY = ledger.PREFIX + "upload-plan"  # hash "app|hour|fid" -> how it is archived (uploader)


class SlotsBusy(Exception):
    """All N slots of an app-hour stayed locked for lock_wait_seconds; the task retries."""


class LockLost(Exception):
    """The lease ran out under us: someone else may own the slot, so nothing is committed."""


_RELEASE = """
for i = 1, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[1] then redis.call('DEL', KEYS[i]) end
end
return 0
"""

# For each app-hour of a bundle, take its lowest free slot and return that slot's state,
# creating the state if the slot has none; {-1} for an app-hour whose N slots are all taken.
# A slot whose mark in the skip mask is '1' is passed over (its file is held by a frozen writer).
# The script builds the N lock and slot key names of each app-hour itself: passing them all
# (2N keys and N ids per frame) was most of the compress stage's Redis cost. Fine on one Redis
# server, which is what sluice runs on; Redis Cluster would need them declared in KEYS.
# KEYS: slot registry.
# ARGV: token, lease ms, now, N, lock key prefix, slot key prefix, then per app-hour its slot id
#       stem "app|hour", a new fid and a skip mask.
_ACQUIRE = """
local token, lease, now, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local lockp, slotp = ARGV[5], ARGV[6]
local out = {}
for p = 0, (#ARGV - 6) / 3 - 1 do
  local stem, fid, skip = ARGV[7 + 3 * p], ARGV[8 + 3 * p], ARGV[9 + 3 * p]
  local got = {-1}
  for k = 1, n do
    local sid = stem .. '|' .. (k - 1)
    if string.sub(skip, k, k) ~= '1' and redis.call('SET', lockp .. sid, token, 'NX', 'PX', lease) then
      local slot = slotp .. sid
      local state = redis.call('HMGET', slot, 'fid', 'size')
      if state[1] then
        got = {k - 1, state[1], tonumber(state[2])}
      else
        redis.call('HSET', slot, 'fid', fid, 'size', 0, 'created', now, 'updated', now)
        redis.call('SADD', KEYS[1], sid)
        got = {k - 1, fid, 0}
      end
      break
    end
  end
  out[p + 1] = got
end
return out
"""

# Under the file locks, for each slot: its committed size if the lock is still ours and the
# slot still has the file we locked, -1 if the lease was lost, -2 if the slot moved on to
# another file (sealed meanwhile). Key names are built here, as in _ACQUIRE.
# ARGV: token, lock key prefix, slot key prefix, then per slot its id and fid.
_VERIFY = """
local token, lockp, slotp = ARGV[1], ARGV[2], ARGV[3]
local out = {}
for p = 0, (#ARGV - 3) / 2 - 1 do
  local sid, fid = ARGV[4 + 2 * p], ARGV[5 + 2 * p]
  local state = redis.call('HMGET', slotp .. sid, 'fid', 'size')
  if state[1] ~= fid then
    out[p + 1] = -2
  elseif redis.call('GET', lockp .. sid) ~= token then
    out[p + 1] = -1
  else
    out[p + 1] = tonumber(state[2])
  end
end
return out
"""

# Commit the appends of a bundle: for each piece still pending, retire it, move the slot's
# committed size and release the lock, sealing the slot in the same step when it has grown past
# the seal size (2). A piece no longer pending (0: a duplicate delivery) keeps its lock, so its
# writer can cut its bytes off before anyone appends after them; -1: the lease was lost. The
# last piece of a batch takes the batch's bytes off the in-flight total, once; the last element
# of the reply says so (1), and the caller removes the batch's pieces files. The piece, app and
# sealed-file names are built from the slot id "app|hour|k" and the fid, as in _ACQUIRE.
# KEYS: pending, groups, state, inflight, stats, sealed, slots, in-flight bytes, batch sizes.
# ARGV: token, now, batch id, seal size, lock key prefix, slot key prefix, then per piece: slot
#       id, fid, new size, records.
_COMMIT = """
local lockp, slotp = ARGV[5], ARGV[6]
local out = {}
for p = 0, (#ARGV - 6) / 4 - 1 do
  local a = 6 + 4 * p
  local sid, fid, size = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local lock, slot = lockp .. sid, slotp .. sid
  local app, hour = string.match(sid, '^([^|]*)|([^|]*)|')
  local piece = app .. '|' .. hour
  local r = 1
  if redis.call('GET', lock) ~= ARGV[1] then
    r = -1
  elseif redis.call('SREM', KEYS[1], piece) == 0 then
    r = 0
  else
    redis.call('HSET', slot, 'size', size, 'updated', ARGV[2])
    redis.call('HDEL', KEYS[2], piece)
    redis.call('HINCRBY', KEYS[5], app, ARGV[a + 4])
    if tonumber(size) >= tonumber(ARGV[4]) then
      redis.call('HSET', KEYS[6], piece .. '|' .. fid, size)
      redis.call('DEL', slot)
      redis.call('SREM', KEYS[7], sid)
      r = 2
    end
    redis.call('DEL', lock)
  end
  out[p + 1] = r
end
local finished = 0
if redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  if redis.call('ZREM', KEYS[4], ARGV[3]) == 1 then
    local bytes = redis.call('HGET', KEYS[9], ARGV[3])
    if bytes then redis.call('DECRBY', KEYS[8], bytes) end
    redis.call('HDEL', KEYS[9], ARGV[3])
    finished = 1
  end
end
out[#out + 1] = finished
return out
"""

_SEAL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if tonumber(ARGV[3]) > 0 then redis.call('HSET', KEYS[3], ARGV[2], ARGV[3]) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[4])
return 1
"""


@dataclass(frozen=True)
class Frame:
    """One compressed (app, hour) piece of a batch, ready to append."""

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


def slot_id(app: str, hour: str, k: int) -> str:
    return f"{app}|{hour}|{k}"


def committed_files(client: redis.Redis, app: str, hour: str, n: int) -> list[tuple[str, int]]:
    """(fid, committed size) of every open and every sealed, not yet uploaded, file of an
    app-hour, read in one transaction: what a reader may read of the spool, without a lock."""
    with client.pipeline(transaction=True) as pipe:
        for k in range(n):
            pipe.hmget(_slot_key(slot_id(app, hour, k)), "fid", "size")
        pipe.hgetall(SEALED_KEY)
        *open_slots, sealed = pipe.execute()
    found = [(fid.decode(), int(size)) for fid, size in open_slots if fid is not None]
    stem = f"{app}|{hour}|"
    found += [(entry.decode()[len(stem):], int(size)) for entry, size in sealed.items()
              if entry.decode().startswith(stem)]
    return found


def _slot_key(sid: str) -> str:
    return f"{ledger.PREFIX}slot:{sid}"


def _lock_key(sid: str) -> str:
    return f"{ledger.PREFIX}lock:{sid}"


class Slots:
    """Appends frames to slot files and seals them, every step under the slot's Redis lock and
    the slot file's kernel lock."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self.spool = Spool(settings.spool_dir)
        self._release = client.register_script(_RELEASE)
        self._acquire_script = client.register_script(_ACQUIRE)
        self._verify = client.register_script(_VERIFY)
        self._commit = client.register_script(_COMMIT)
        self._seal = client.register_script(_SEAL)

    # --- locks -------------------------------------------------------------------------
    def _try_lock(self, sid: str) -> str | None:
        token = uuid.uuid4().hex
        lease_ms = int(self.settings.lock_lease_seconds * 1000)
        if self.r.set(_lock_key(sid), token, nx=True, px=lease_ms):
            return token
        return None

    def _unlock(self, sids: list[str], token: str) -> None:
        """Release those of these slot locks that are still ours; one round trip."""
        if sids:
            self._release(keys=[_lock_key(sid) for sid in sids], args=[token])

    def _acquire(self, frames: list[Frame], token: str, skip: set[str]) -> list[_Held | None]:
        """One round trip: the lowest free slot of each frame's app-hour, or None if all busy.

        Lowest first, so a quiet app writes one file per hour, not N. Slots in `skip` are
        passed over.
        """
        n = self.settings.slots_per_app
        args: list[object] = [token, int(self.settings.lock_lease_seconds * 1000), time.time(), n,
                              _lock_key(""), _slot_key("")]
        for f in frames:
            stem = f"{f.app}|{f.hour}"
            args += [stem, f"{f.hour}-{uuid.uuid4().hex[:16]}",
                     "".join("1" if slot_id(f.app, f.hour, k) in skip else "0" for k in range(n))
                     if skip else ""]
        held: list[_Held | None] = []
        for f, got in zip(frames, self._acquire_script(keys=[SLOTS_KEY], args=args)):
            if got[0] < 0:
                held.append(None)
            else:
                held.append(_Held(f, slot_id(f.app, f.hour, got[0]), got[1].decode(), int(got[2])))
        return held

    # --- append ------------------------------------------------------------------------
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

    def _append_claimed(self, bid: str, token: str, claimed: list[_Held],
                        frozen: set[str]) -> tuple[int, list[Frame]]:
        """Write and commit the frames of the slots we hold; (appended, frames to place again)."""
        busy: list[Frame] = []
        held = {h.sid for h in claimed}  # the locks still ours to release: the commit releases most
        with contextlib.ExitStack() as stack:
            # Registered first, so it runs last: after the file locks are released.
            stack.callback(lambda: self._unlock(sorted(held), token))
            files: list[tuple[_Held, int]] = []
            for h in claimed:
                path = self.spool.open_path(h.frame.app, h.frame.hour, h.fid)
                try:
                    fd = stack.enter_context(locked_file(path, create=h.size == 0))
                except FileBusy:
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
        args: list[object] = [token, _lock_key(""), _slot_key("")]
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
        keys = [ledger.pending_key(bid), ledger.groups_key(bid), ledger.state_key(bid),
                ledger.INFLIGHT_KEY, ledger.STATS_KEY, SEALED_KEY, SLOTS_KEY,
                ledger.INFLIGHT_BYTES_KEY, ledger.BATCH_BYTES_KEY]
        args: list[object] = [token, time.time(), bid, self.settings.seal_size_bytes, _lock_key(""), _slot_key("")]
        for (h, _), end in zip(files, ends):
            args += [h.sid, h.fid, end, h.frame.records]
        *results, finished = self._commit(keys=keys, args=args)
        held.difference_update(h.sid for (h, _), result in zip(files, results) if result > 0)
        if finished:
            ledger.drop_pieces(self.settings.spool_dir, bid)
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

    # --- seal --------------------------------------------------------------------------
    def _seal_locked(self, sid: str, token: str, app: str, hour: str) -> SealedFile | None:
        state = self.r.hgetall(_slot_key(sid))
        if not state:
            self.r.srem(SLOTS_KEY, sid)
            return None
        sealed = SealedFile(app, hour, state[b"fid"].decode(), int(state[b"size"]))
        path = self.spool.open_path(app, hour, sealed.fid)
        try:
            with locked_file(path) as fd:
                self._seal_state(sid, token, sealed)
                if sealed.size == 0:
                    path.unlink()
                    return None
                self.spool.finish_seal(sealed, fd)
                return sealed
        except FileBusy:
            return None  # a frozen writer holds it; a later sweep seals it
        except FileNotFoundError:
            if sealed.size:
                raise SpoolDamaged(f"{path} is missing; {sealed.size} bytes were committed") from None
            self._seal_state(sid, token, sealed)  # claimed but never written
            return None

    def _seal_state(self, sid: str, token: str, sealed: SealedFile) -> None:
        result = self._seal(keys=[_lock_key(sid), _slot_key(sid), SEALED_KEY, SLOTS_KEY],
                            args=[token, sealed.entry, sealed.size, sid])
        if result == -1:
            raise LockLost(f"lease on slot {sid} expired while sealing")

    def seal_due(self, now: float | None = None) -> int:
        """Seal every slot that is full or idle long enough (see `_due`); how many were sealed.

        The states of all slots are read in one round trip: a sweep runs every few seconds
        over every open app-hour, and one read per slot was most of its cost."""
        now = time.time() if now is None else now
        sids = [raw.decode() for raw in self.r.smembers(SLOTS_KEY)]
        with self.r.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hgetall(_slot_key(sid))
            states = pipe.execute()
        sealed = 0
        for sid, state in zip(sids, states):
            if not self._due(sid, state, now):
                continue
            token = self._try_lock(sid)
            if token is None:
                continue  # being appended to right now, so not idle
            try:
                if self._due(sid, self.r.hgetall(_slot_key(sid)), now):
                    app, hour, _ = sid.split("|")
                    if self._seal_locked(sid, token, app, hour):
                        sealed += 1
            finally:
                self._unlock([sid], token)
        return sealed

    def _due(self, sid: str, state: dict[bytes, bytes], now: float) -> bool:
        if not state:
            return True  # stale registry entry; sealing it just drops the entry
        if int(state[b"size"]) >= self.settings.seal_size_bytes:
            return True
        hour = sid.split("|")[1]
        hour_over = now >= hour_start(hour) + 3600
        idle = now - float(state[b"updated"])
        s = self.settings
        return idle >= (s.seal_age_seconds if hour_over else s.seal_open_hour_age_seconds)

    def sealed_files(self) -> list[SealedFile]:
        return [SealedFile.from_entry(entry.decode(), int(size))
                for entry, size in self.r.hgetall(SEALED_KEY).items()]

    def is_sealed(self, sealed: SealedFile) -> bool:
        """Still awaiting upload (not archived and forgotten since it was listed)."""
        return self.r.hexists(SEALED_KEY, sealed.entry)

    def upload_plan(self, sealed: SealedFile) -> str | None:
        plan = self.r.hget(PLAN_KEY, sealed.entry)
        return plan.decode() if plan is not None else None

    def plan_upload(self, sealed: SealedFile, plan: str) -> str:
        """Record how a sealed file is archived, unless a plan is recorded already; the plan
        in force. Decided once, so a repeated upload never decides differently."""
        self.r.hsetnx(PLAN_KEY, sealed.entry, plan)
        return self.upload_plan(sealed) or plan

    def planned(self) -> list[str]:
        return [plan.decode() for plan in self.r.hvals(PLAN_KEY)]

    def forget_sealed(self, sealed: SealedFile) -> None:
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hdel(SEALED_KEY, sealed.entry)
            pipe.hdel(PLAN_KEY, sealed.entry)
            pipe.execute()
