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

_COMMIT_APPEND = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if redis.call('SREM', KEYS[3], ARGV[2]) == 0 then return 0 end
redis.call('HSET', KEYS[2], 'size', ARGV[3], 'updated', ARGV[4])
redis.call('HDEL', KEYS[4], ARGV[2])
redis.call('HINCRBY', KEYS[7], ARGV[6], ARGV[7])
if redis.call('SCARD', KEYS[3]) == 0 then
  redis.call('DEL', KEYS[4], KEYS[5])
  redis.call('ZREM', KEYS[6], ARGV[5])
end
return 1
"""

_SEAL = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
if tonumber(ARGV[3]) > 0 then redis.call('HSET', KEYS[3], ARGV[2], ARGV[3]) end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[4], ARGV[4])
return 1
"""


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
        self._commit = client.register_script(_COMMIT_APPEND)
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

    def _lock_any_slot(self, app: str, hour: str) -> tuple[str, str]:
        """Lowest free slot first, so a quiet app writes one file per hour, not N."""
        deadline = time.monotonic() + self.settings.lock_wait_seconds
        while True:
            for k in range(self.settings.slots_per_app):
                sid = slot_id(app, hour, k)
                token = self._try_lock(sid)
                if token:
                    return sid, token
            if time.monotonic() > deadline:
                raise SlotsBusy(f"all {self.settings.slots_per_app} slots of {app} {hour} are busy")
            time.sleep(random.uniform(0.01, 0.05))

    # --- append ------------------------------------------------------------------------
    def _slot_state(self, sid: str, app: str, hour: str) -> tuple[str, int]:
        """(fid, committed size) of the slot, creating a new slot file id when it has none."""
        state = self.r.hgetall(_slot_key(sid))
        if state:
            return state[b"fid"].decode(), int(state[b"size"])
        fid = f"{hour}-{uuid.uuid4().hex[:16]}"
        now = time.time()
        with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(_slot_key(sid), mapping={"fid": fid, "size": 0, "created": now, "updated": now})
            pipe.sadd(SLOTS_KEY, sid)
            pipe.execute()
        return fid, 0

    def append(self, bid: str, app: str, hour: str, frame: bytes, nrecords: int) -> bool:
        """Append one frame for batch piece (bid, app, hour) exactly once.

        Returns False when the piece was already appended (a redelivered or redriven task).
        """
        piece = ledger.piece_name(app, hour)
        sid, token = self._lock_any_slot(app, hour)
        try:
            fid, size = self._slot_state(sid, app, hour)
            path = self.spool.open_path(app, hour, fid)
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                on_disk = os.fstat(fd).st_size
                if on_disk < size:
                    raise SpoolDamaged(f"{path} has {on_disk} bytes, {size} were committed")
                if on_disk > size:
                    os.ftruncate(fd, size)  # torn tail of a writer that died before committing
                os.pwrite(fd, frame, size)
                os.fsync(fd)
                new_size = size + len(frame)
                done = self._commit(
                    keys=[_lock_key(sid), _slot_key(sid), ledger.pending_key(bid),
                          ledger.groups_key(bid), ledger.state_key(bid), ledger.INFLIGHT_KEY,
                          ledger.STATS_KEY],
                    args=[token, piece, new_size, time.time(), bid, app, nrecords])
                if done == -1:  # the file may be someone else's now: leave it alone
                    raise LockLost(f"lease on slot {sid} expired during an append")
                if done == 0:  # a duplicate task: take our bytes back off the tail
                    os.ftruncate(fd, size)
            finally:
                os.close(fd)
            if done == 1 and new_size >= self.settings.seal_size_bytes:
                self._seal_locked(sid, token, app, hour)
            return done == 1
        finally:
            self._unlock(sid, token)

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
        """Seal every slot idle for seal_age_seconds or grown past seal_size_bytes."""
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
        idle = now - float(state[b"updated"])
        return idle >= self.settings.seal_age_seconds or int(state[b"size"]) >= self.settings.seal_size_bytes

    def sealed_files(self) -> list[SealedFile]:
        return [SealedFile.from_entry(entry.decode(), int(size))
                for entry, size in self.r.hgetall(SEALED_KEY).items()]

    def forget_sealed(self, sealed: SealedFile) -> None:
        self.r.hdel(SEALED_KEY, sealed.entry)
