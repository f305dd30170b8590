"""Batch lifecycle in Redis: hand-over (bridge), split commit, and what is still in flight.

A batch moves handed -> split -> gone. Every transition is one atomic Redis script, so a
crash between any two steps leaves a state from which a redelivered task, or the redrive
sweep, finishes the work without doing any part of it twice:

- the per-partition high-water mark (`HWM_KEY`) is the ledger of handed-over offsets; the
  bridge drops records at or below it, so a Kafka replay after a crash is never handed twice.
  It keeps a fingerprint of the record at the mark (`FINGERPRINT_KEY`) and the incarnation of
  the topic it belongs to (`INCARNATION_KEY`), so a recreated topic is told from a replay
  (see bridge.incarnation);
- a split batch keeps a *pending* set of its (app, hour) pieces; a piece leaves the set in the
  same script that commits its append, so a redelivered compress task finds nothing to do.
"""

from __future__ import annotations

import mmap
import os
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import redis

from sluice.settings import Settings
from sluice.spool import durable_mkdir, fsync_dir

PREFIX = "sluice:"
HWM_KEY = PREFIX + "hwm"
FINGERPRINT_KEY = PREFIX + "hwm:fingerprint"
INCARNATION_KEY = PREFIX + "hwm:incarnation"
# Records handed over by earlier incarnations of a partition, for progress reports.
EARLIER_KEY = PREFIX + "hwm:earlier"
INFLIGHT_KEY = PREFIX + "inflight"
# Bytes of the batches handed over and not yet all appended (the bridge's backpressure bound),
# and each in-flight batch's share of it.
INFLIGHT_BYTES_KEY = PREFIX + "inflight:bytes"
BATCH_BYTES_KEY = PREFIX + "inflight:batch-bytes"
STATS_KEY = PREFIX + "stats:records"

# What batch payloads and pieces are handled as: bytes, views of fetched bytes, mapped files.
BytesLike = bytes | memoryview | mmap.mmap


def state_key(bid: str) -> str:
    return f"{PREFIX}b:{bid}:state"


def payload_key(bid: str) -> str:
    return f"{PREFIX}b:{bid}:payload"


def groups_key(bid: str) -> str:
    return f"{PREFIX}b:{bid}:groups"


def pending_key(bid: str) -> str:
    return f"{PREFIX}b:{bid}:pending"


def queued_key(bid: str) -> str:
    return f"{PREFIX}b:{bid}:queued"


# How long a task id stays noted as queued: the broker's visibility timeout (tasks.app), after
# which the broker hands a dead worker's reserved task out again anyway.
QUEUED_TTL_SECONDS = 3600


def piece_name(app: str, hour: str) -> str:
    return f"{app}|{hour}"


def split_piece(piece: str) -> tuple[str, str]:
    app, hour = piece.split("|")
    return app, hour


_HAND_OVER = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return {0, cur} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
redis.call('HSET', KEYS[5], ARGV[1], ARGV[8])
if ARGV[6] == '1' then redis.call('SET', KEYS[4], ARGV[7]) end
redis.call('SET', KEYS[3], 'handed')
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
redis.call('HSET', KEYS[7], ARGV[4], ARGV[9])
redis.call('INCRBY', KEYS[6], ARGV[9])
return {1, ''}
"""

# Start a new incarnation of a partition whose mark is still ARGV[2]; its new number, or -1.
_NEW_INCARNATION = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return -1 end
if cur ~= '' then redis.call('HINCRBY', KEYS[3], ARGV[1], tonumber(cur) + 1) end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('HINCRBY', KEYS[4], ARGV[1], 1)
"""

_SPLIT_COMMIT = """
if redis.call('GET', KEYS[1]) ~= 'handed' then return 0 end
for i = 1, #ARGV, 2 do
  redis.call('HSET', KEYS[2], ARGV[i], ARGV[i + 1])
  redis.call('SADD', KEYS[3], ARGV[i])
end
redis.call('SET', KEYS[1], 'split')
redis.call('DEL', KEYS[4])
return 1
"""


@dataclass(frozen=True)
class Mark:
    """How far a partition has been handed over, and in which incarnation of its topic."""

    last: int | None  # the last offset handed over, None before the first hand-over
    fingerprint: str | None  # of the record at `last` (None for marks older than fingerprints)
    incarnation: int


class Ledger:
    """The Redis side of the batch lifecycle, plus the claim-check payload store."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self._hand_over = client.register_script(_HAND_OVER)
        self._split_commit = client.register_script(_SPLIT_COMMIT)
        self._new_incarnation = client.register_script(_NEW_INCARNATION)

    # --- bridge side -------------------------------------------------------------------
    def high_water_mark(self, topic: str, partition: int) -> int | None:
        """Last offset of this partition already handed over, or None."""
        value = self.r.hget(HWM_KEY, f"{topic}:{partition}")
        return int(value) if value is not None else None

    def mark(self, topic: str, partition: int) -> Mark:
        field = f"{topic}:{partition}"
        with self.r.pipeline(transaction=False) as pipe:
            for key in (HWM_KEY, FINGERPRINT_KEY, INCARNATION_KEY):
                pipe.hget(key, field)
            last, fingerprint, incarnation = pipe.execute()
        return Mark(int(last) if last is not None else None,
                    fingerprint.decode() if fingerprint is not None else None,
                    int(incarnation or 0))

    def new_incarnation(self, topic: str, partition: int, expected_hwm: int | None) -> bool:
        """Forget the mark of an earlier incarnation of the topic; False if the mark moved."""
        return self._new_incarnation(
            keys=[HWM_KEY, FINGERPRINT_KEY, EARLIER_KEY, INCARNATION_KEY],
            args=[f"{topic}:{partition}", "" if expected_hwm is None else str(expected_hwm)]) >= 0

    def hand_over(self, bid: str, topic: str, partition: int, expected_hwm: int | None,
                  last: int, payload: Sequence[BytesLike], fingerprint: str = "") -> bool:
        """Store the batch (the concatenation of `payload`) once and advance the high-water
        mark, atomically.

        False when the mark moved since it was read (another bridge handed these offsets
        over); the caller re-reads the mark and trims its batch.
        """
        in_redis = self.settings.claim_check == "redis"
        size = sum(len(part) for part in payload)
        if not in_redis:
            _write_durably(self.spool_batch_path(bid), payload)
        ok, _ = self._hand_over(
            keys=[HWM_KEY, INFLIGHT_KEY, state_key(bid), payload_key(bid), FINGERPRINT_KEY,
                  INFLIGHT_BYTES_KEY, BATCH_BYTES_KEY],
            args=[f"{topic}:{partition}", "" if expected_hwm is None else str(expected_hwm),
                  str(last), bid, time.time(), "1" if in_redis else "0",
                  b"".join(payload) if in_redis else b"", fingerprint, size],
        )
        if not ok and not in_redis and self.state(bid) is None:
            # Nobody handed this id over (same id means same bytes), so the file is ours.
            self.spool_batch_path(bid).unlink(missing_ok=True)
        return bool(ok)

    def spool_batch_path(self, bid: str) -> Path:
        return self.settings.spool_dir / "batches" / f"{bid}.kafka"

    # --- split side --------------------------------------------------------------------
    def state(self, bid: str) -> str | None:
        value = self.r.get(state_key(bid))
        return value.decode() if value is not None else None

    def load_payload(self, bid: str) -> BytesLike:
        """The batch's bytes; from the spool, mapped rather than read (a 16 MiB copy into fresh
        memory per batch, page faults included, cost more than decoding it)."""
        if self.settings.claim_check == "redis":
            payload = self.r.get(payload_key(bid))
            if payload is None:
                raise LookupError(f"batch {bid} is handed over but its payload is missing from Redis")
            return payload
        with open(self.spool_batch_path(bid), "rb") as fh:
            if os.fstat(fh.fileno()).st_size == 0:
                return b""
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    def commit_split(self, bid: str, groups: dict[str, bytes], records: dict[str, int] | None = None) -> bool:
        """Record the pieces of a handed-over batch (and how many records, lines, each holds);
        False if it was already split.

        The pieces are written once, to one file of the spool (fsynced before Redis refers to
        it); Redis keeps only where each lies, "token:offset:length:records". Each delivery
        writes a file of its own, so a duplicate that loses the race removes just its own.
        """
        token = uuid.uuid4().hex[:12]
        path = self.pieces_path(bid, token)
        args: list[str] = []
        offset = 0
        for piece, data in groups.items():
            count = records[piece] if records is not None else data.count(b"\n")
            args += [piece, f"{token}:{offset}:{len(data)}:{count}"]
            offset += len(data)
        _write_durably(path, groups.values())
        try:
            done = self._split_commit(
                keys=[state_key(bid), groups_key(bid), pending_key(bid), payload_key(bid)], args=args)
        except BaseException:
            path.unlink(missing_ok=True)  # nobody refers to it; a retried split writes another
            raise
        if not done:
            path.unlink(missing_ok=True)
        if self.settings.claim_check == "spool":
            self.spool_batch_path(bid).unlink(missing_ok=True)
        return bool(done)

    def pieces_path(self, bid: str, token: str) -> Path:
        return self.settings.spool_dir / "pieces" / f"{bid}.{token}"

    def pending_pieces(self, bid: str) -> list[str]:
        return sorted(p.decode() for p in self.r.smembers(pending_key(bid)))

    def pieces_data(self, bid: str, pieces: list[str]) -> list[tuple[bytes, int] | None]:
        """Data and record count of each piece; None for a piece already appended."""
        refs = self.r.hmget(groups_key(bid), pieces) if pieces else []
        out: list[tuple[bytes, int] | None] = []
        files: dict[str, int] = {}
        try:
            for ref in refs:
                if ref is None:
                    out.append(None)
                    continue
                token, offset, length, count = _piece_ref(ref)
                if token not in files:
                    files[token] = os.open(self.pieces_path(bid, token), os.O_RDONLY)
                data = os.pread(files[token], length, offset)
                if len(data) != length:
                    raise IOError(f"pieces file of {bid} is shorter than its index says")
                out.append((data, count if count is not None else data.count(b"\n")))
        finally:
            for fd in files.values():
                os.close(fd)
        return out

    def pending_sizes(self, bid: str) -> dict[str, int]:
        """Pending pieces of a batch and their sizes in bytes."""
        pieces = self.pending_pieces(bid)
        refs = self.r.hmget(groups_key(bid), pieces) if pieces else []
        return {piece: _piece_ref(ref)[2] for piece, ref in zip(pieces, refs) if ref}

    def drop_orphan_pieces(self, older_than: float) -> int:
        """Pieces files of batches no longer in flight (a worker died between the last commit
        and the cleanup, or a split died before its commit); how many were removed."""
        removed = 0
        cutoff = time.time() - older_than
        for path in (self.settings.spool_dir / "pieces").glob("*"):
            bid = path.name.rsplit(".", 1)[0]
            try:
                old = path.stat().st_mtime < cutoff
            except FileNotFoundError:
                continue
            if old and self.r.zscore(INFLIGHT_KEY, bid) is None:
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    # --- recovery ----------------------------------------------------------------------
    def stale_batches(self, older_than: float) -> list[str]:
        """Batches handed over more than `older_than` seconds ago and not yet fully archived."""
        cutoff = time.time() - older_than
        return [b.decode() for b in self.r.zrangebyscore(INFLIGHT_KEY, "-inf", cutoff)]

    def will_queue(self, bid: str, task_id: str) -> None:
        """Note a task of this batch as queued, before it is sent (see `queued`)."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.sadd(queued_key(bid), task_id)
            pipe.expire(queued_key(bid), QUEUED_TTL_SECONDS)
            pipe.execute()

    def started(self, bid: str, task_id: str) -> None:
        """A task of this batch left the queue (or was never sent); a retry keeps its id."""
        self.r.srem(queued_key(bid), task_id)

    def queued(self, bid: str, waiting: set[str]) -> bool:
        """Some task of this batch still waits in the broker's queue: redriving it would only
        pile up copies (a cpu worker outage used to queue each batch's work once per redrive
        period). `waiting`: the ids of the tasks in the queues now; the batch's own note can be
        stale (a send or a start that Redis went down under), the queue cannot."""
        return not waiting.isdisjoint(t.decode() for t in self.r.smembers(queued_key(bid)))

    def touch(self, bid: str) -> None:
        """Restart the redrive clock of a batch, so a backlog is redriven once, not every sweep."""
        self.r.zadd(INFLIGHT_KEY, {bid: time.time()}, xx=True)

    def inflight_count(self) -> int:
        return int(self.r.zcard(INFLIGHT_KEY))

    def inflight_bytes(self) -> int:
        """Bytes of the handed-over batches not yet all appended: payloads and pieces in Redis
        or the spool (the backpressure bound)."""
        return int(self.r.get(INFLIGHT_BYTES_KEY) or 0)


def _piece_ref(ref: bytes) -> tuple[str, int, int, int | None]:
    """(pieces file token, offset, length, records) from a piece's ref as commit_split writes it;
    records is None in a ref written before counts were kept."""
    token, offset, length, *count = ref.decode().split(":")
    return token, int(offset), int(length), int(count[0]) if count else None


def drop_pieces(spool_dir: Path, bid: str) -> None:
    """Remove the pieces files of a batch whose every piece is appended."""
    for path in (spool_dir / "pieces").glob(f"{bid}.*"):
        path.unlink(missing_ok=True)


def bundle_pieces(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group pieces into compress tasks of about max_bytes each.

    A 4 MB batch of a Zipf mix splits into ~200 pieces, mostly tiny; one task per piece would
    spend more on task and lock overhead than on compressing. A piece larger than max_bytes
    gets a task of its own.
    """
    bundles: list[list[str]] = []
    current: list[str] = []
    size = 0
    for piece in sorted(sizes):
        if current and size + sizes[piece] > max_bytes:
            bundles.append(current)
            current, size = [], 0
        current.append(piece)
        size += sizes[piece]
    if current:
        bundles.append(current)
    return bundles


def _write_durably(path: Path, parts: Iterable[BytesLike]) -> None:
    """Write the parts one after the other (not joined first: that was one more copy of every
    byte) then rename, with fsync of the file and its directory, so a reader never sees a
    half-written batch and a power loss never loses one that Redis refers to."""
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
