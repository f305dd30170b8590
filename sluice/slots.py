"""Slot files: at most N appenders per app-hour, each owning one spool file under a Redis lock.

A zstd stream may be a concatenation of frames, so a slot file grows by whole frames. The
committed size lives in Redis and moves only in the script that also retires the batch piece,
so whatever lies past it (a torn write of a killed worker, or the write of a duplicate task
that lost the race) is cut off before the next append or when the slot is sealed.
"""

from __future__ import annotations

import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from sluice import ledger
from sluice.records import hour_start
from sluice.settings import Settings

SLOTS_KEY = ledger.PREFIX + "slots"  # set of slot ids "app|hour|k" that have state
SEALED_KEY = ledger.PREFIX + "sealed"  # hash "app|hour|fid" -> committed size, awaiting upload


class SlotsBusy(Exception):
    """All N slots of an app-hour stayed locked for lock_wait_seconds; the task retries."""


class LockLost(Exception):
    """The lease ran out under us: someone else may own the slot, so nothing is committed."""


class SpoolDamaged(Exception):
    """A slot file is shorter than its committed size: the spool lost data outside sluice."""


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# For each app-hour of a bundle, take its lowest free slot and return that slot's state,
# creating the state if the slot has none; {-1} for an app-hour whose N slots are all taken.
# KEYS: slot registry, then per app-hour N lock keys and N slot keys.
# ARGV: token, lease ms, now, N, then per app-hour a new fid and its N slot ids.
_ACQUIRE = """
local token, lease, now, n = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local out = {}
for p = 0, (#KEYS - 1) / (2 * n) - 1 do
  local kb, ab = 1 + p * 2 * n, 4 + p * (n + 1)
  local got = {-1}
  for k = 1, n do
    if redis.call('SET', KEYS[kb + k], token, 'NX', 'PX', lease) then
      local state = redis.call('HMGET', KEYS[kb + n + k], 'fid', 'size')
      if state[1] then
        got = {k - 1, state[1], tonumber(state[2])}
      else
        redis.call('HSET', KEYS[kb + n + k], 'fid', ARGV[ab + 1], 'size', 0, 'created', now, 'updated', now)
        redis.call('SADD', KEYS[1], ARGV[ab + 1 + k])
        got = {k - 1, ARGV[ab + 1], 0}
      end
      break
    end
  end
  out[p + 1] = got
end
return out
"""

# Commit the appends of a bundle: for each piece still pending, retire it, move the slot's
# committed size and release the lock, sealing the slot in the same step when it has grown past
# the seal size (2). A piece no longer pending (0: a duplicate delivery) keeps its lock, so its
# writer can cut its bytes off before anyone appends after them; -1: the lease was lost.
# KEYS: pending, groups, state, inflight, stats, sealed, slots, then per piece: lock, slot.
# ARGV: token, now, batch id, seal size, then per piece: piece, new size, app, records,
#       sealed entry, slot id.
_COMMIT = """
local out = {}
for p = 0, (#KEYS - 7) / 2 - 1 do
  local lock, slot, a = KEYS[8 + 2 * p], KEYS[9 + 2 * p], 4 + 6 * p
  local piece, size = ARGV[a + 1], ARGV[a + 2]
  local r = 1
  if redis.call('GET', lock) ~= ARGV[1] then
    r = -1
  elseif redis.call('SREM', KEYS[1], piece) == 0 then
    r = 0
  else
    redis.call('HSET', slot, 'size', size, 'updated', ARGV[2])
    redis.call('HDEL', KEYS[2], piece)
    redis.call('HINCRBY', KEYS[5], ARGV[a + 3], ARGV[a + 4])
    if tonumber(size) >= tonumber(ARGV[4]) then
      redis.call('HSET', KEYS[6], ARGV[a + 5], size)
      redis.call('DEL', slot)
      redis.call('SREM', KEYS[7], ARGV[a + 6])
      r = 2
    end
    redis.call('DEL', lock)
  end
  out[p + 1] = r
end
if redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('ZREM', KEYS[4], ARGV[3])
end
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


def _slot_key(sid: str) -> str:
    return f"{ledger.PREFIX}slot:{sid}"


def _lock_key(sid: str) -> str:
    return f"{ledger.PREFIX}lock:{sid}"


@dataclass(frozen=True)
class SealedFile:
    """A slot file that takes no more appends; `size` bytes of it are committed."""

    app: str
    hour: str
    fid: str
    size: int

    @property
    def entry(self) -> str:
        return f"{self.app}|{self.hour}|{self.fid}"

    @classmethod
    def from_entry(cls, entry: str, size: int) -> "SealedFile":
        app, hour, fid = entry.split("|")
        return cls(app, hour, fid, size)


class Spool:
    """Paths in the spool directory: open slot files and sealed ones awaiting upload."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def open_path(self, app: str, hour: str, fid: str) -> Path:
        return self.root / "open" / app / hour / f"{fid}.jsonl.zst"

    def sealed_path(self, app: str, hour: str, fid: str) -> Path:
        return self.root / "sealed" / app / hour / f"{fid}.jsonl.zst"

    def finish_seal(self, sealed: SealedFile) -> Path:
        """Cut the open file to its committed size and move it aside; idempotent."""
        src = self.open_path(sealed.app, sealed.hour, sealed.fid)
        dst = self.sealed_path(sealed.app, sealed.hour, sealed.fid)
        if src.exists():
            with open(src, "r+b") as fh:
                if os.fstat(fh.fileno()).st_size < sealed.size:
                    raise SpoolDamaged(f"{src} is shorter than its committed {sealed.size} bytes")
                fh.truncate(sealed.size)
                os.fsync(fh.fileno())
            dst.parent.mkdir(parents=True, exist_ok=True)
            src.replace(dst)
            for parent in (src.parent, src.parent.parent):  # app/hour dirs of the open tree
                try:
                    parent.rmdir()
                except OSError:
                    break
        return dst


class Slots:
    """Appends frames to slot files and seals them, every step under the slot's Redis lock."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self.spool = Spool(settings.spool_dir)
        self._release = client.register_script(_RELEASE)
        self._acquire_script = client.register_script(_ACQUIRE)
        self._commit = client.register_script(_COMMIT)
        self._seal = client.register_script(_SEAL)

    # --- locks -------------------------------------------------------------------------
    def _try_lock(self, sid: str) -> str | None:
        token = uuid.uuid4().hex
        lease_ms = int(self.settings.lock_lease_seconds * 1000)
        if self.r.set(_lock_key(sid), token, nx=True, px=lease_ms):
            return token
        return None

    def _unlock(self, sid: str, token: str) -> None:
        self._release(keys=[_lock_key(sid)], args=[token])

    def _acquire(self, frames: list[Frame], token: str) -> list[_Held | None]:
        """One round trip: the lowest free slot of each frame's app-hour, or None if all busy.

        Lowest first, so a quiet app writes one file per hour, not N.
        """
        n = self.settings.slots_per_app
        keys: list[str] = [SLOTS_KEY]
        args: list[object] = [token, int(self.settings.lock_lease_seconds * 1000), time.time(), n]
        sids_of = []
        for f in frames:
            sids = [slot_id(f.app, f.hour, k) for k in range(n)]
            sids_of.append(sids)
            keys += [*map(_lock_key, sids), *map(_slot_key, sids)]
            args += [f"{f.hour}-{uuid.uuid4().hex[:16]}", *sids]
        held: list[_Held | None] = []
        for f, sids, got in zip(frames, sids_of, self._acquire_script(keys=keys, args=args)):
            if got[0] < 0:
                held.append(None)
            else:
                held.append(_Held(f, sids[got[0]], got[1].decode(), int(got[2])))
        return held

    # --- append ------------------------------------------------------------------------
    def append(self, bid: str, app: str, hour: str, frame: bytes, nrecords: int) -> bool:
        """Append one frame for batch piece (bid, app, hour) exactly once."""
        return self.append_many(bid, [Frame(app, hour, frame, nrecords)]) == 1

    def append_many(self, bid: str, frames: list[Frame]) -> int:
        """Append each frame of batch `bid` exactly once; returns how many this call appended.

        Pieces already appended by an earlier delivery are skipped. Three round trips to Redis
        for the whole bundle, whatever its size: acquire, (write + fsync each file), commit.
        """
        appended = 0
        todo = frames
        deadline = time.monotonic() + self.settings.lock_wait_seconds
        while todo:
            token = uuid.uuid4().hex
            held = self._acquire(todo, token)
            ready = [h for h in held if h is not None]
            if ready:
                appended += self._write_and_commit(bid, token, ready)
            todo = [f for f, h in zip(todo, held) if h is None]
            if todo:
                if time.monotonic() > deadline:
                    raise SlotsBusy(f"all {self.settings.slots_per_app} slots of "
                                    f"{todo[0].app} {todo[0].hour} are busy")
                time.sleep(random.uniform(0.01, 0.05))
        return appended

    def _write(self, h: _Held) -> int:
        """Write the frame at the committed size, cutting any torn tail first; new size."""
        path = self.spool.open_path(h.frame.app, h.frame.hour, h.fid)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            on_disk = os.fstat(fd).st_size
            if on_disk < h.size:
                raise SpoolDamaged(f"{path} has {on_disk} bytes, {h.size} were committed")
            if on_disk > h.size:
                os.ftruncate(fd, h.size)  # torn tail of a writer that died before committing
            os.pwrite(fd, h.frame.data, h.size)
            os.fsync(fd)
        finally:
            os.close(fd)
        return h.size + len(h.frame.data)

    def _write_and_commit(self, bid: str, token: str, held: list[_Held]) -> int:
        unlocked: set[str] = set()
        try:
            sizes = [self._write(h) for h in held]
            keys = [ledger.pending_key(bid), ledger.groups_key(bid), ledger.state_key(bid),
                    ledger.INFLIGHT_KEY, ledger.STATS_KEY, SEALED_KEY, SLOTS_KEY]
            args: list[object] = [token, time.time(), bid, self.settings.seal_size_bytes]
            for h, size in zip(held, sizes):
                keys += [_lock_key(h.sid), _slot_key(h.sid)]
                args += [ledger.piece_name(h.frame.app, h.frame.hour), size, h.frame.app,
                         h.frame.records, SealedFile(h.frame.app, h.frame.hour, h.fid, size).entry, h.sid]
            results = self._commit(keys=keys, args=args)
            lost = []
            for h, size, result in zip(held, sizes, results):
                if result != 0:
                    unlocked.add(h.sid)  # committed (lock released) or not ours any more
                if result == 0:  # a duplicate delivery: take our bytes back off the tail
                    os.truncate(self.spool.open_path(h.frame.app, h.frame.hour, h.fid), h.size)
                elif result == 2:  # sealed by size; nobody appends to this fid any more
                    self.spool.finish_seal(SealedFile(h.frame.app, h.frame.hour, h.fid, size))
                elif result == -1:  # the file may be someone else's now: leave it alone
                    lost.append(h.sid)
            if lost:
                raise LockLost(f"lease on slots {lost} expired during an append")
            return sum(1 for r in results if r > 0)
        finally:
            for h in held:
                if h.sid not in unlocked:
                    self._unlock(h.sid, token)

    # --- seal --------------------------------------------------------------------------
    def _seal_locked(self, sid: str, token: str, app: str, hour: str) -> SealedFile | None:
        state = self.r.hgetall(_slot_key(sid))
        if not state:
            self.r.srem(SLOTS_KEY, sid)
            return None
        sealed = SealedFile(app, hour, state[b"fid"].decode(), int(state[b"size"]))
        result = self._seal(keys=[_lock_key(sid), _slot_key(sid), SEALED_KEY, SLOTS_KEY],
                            args=[token, sealed.entry, sealed.size, sid])
        if result == -1:
            raise LockLost(f"lease on slot {sid} expired while sealing")
        if sealed.size == 0:
            self.spool.open_path(app, hour, sealed.fid).unlink(missing_ok=True)
            return None
        self.spool.finish_seal(sealed)
        return sealed

    def seal_due(self, now: float | None = None) -> int:
        """Seal every slot that is full or idle long enough (see `_due`); how many were sealed."""
        now = time.time() if now is None else now
        sealed = 0
        for raw in self.r.smembers(SLOTS_KEY):
            sid = raw.decode()
            if not self._due(sid, now):
                continue
            token = self._try_lock(sid)
            if token is None:
                continue  # being appended to right now, so not idle
            try:
                if self._due(sid, now):
                    app, hour, _ = sid.split("|")
                    if self._seal_locked(sid, token, app, hour):
                        sealed += 1
            finally:
                self._unlock(sid, token)
        return sealed

    def _due(self, sid: str, now: float) -> bool:
        state = self.r.hgetall(_slot_key(sid))
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

    def forget_sealed(self, sealed: SealedFile) -> None:
        self.r.hdel(SEALED_KEY, sealed.entry)
