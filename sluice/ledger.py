"""Batch lifecycle in Redis: hand-over (bridge), split commit, and what is still in flight.

A batch moves handed -> split -> gone. Every transition is one atomic Redis script, so a
crash between any two steps leaves a state from which a redelivered task, or the redrive
sweep, finishes the work without doing any part of it twice:

- the per-partition high-water mark (`HWM_KEY`) is the ledger of handed-over offsets; the
  bridge drops records at or below it, so a Kafka replay after a crash is never handed twice;
- a split batch keeps a *pending* set of its (app, hour) pieces; a piece leaves the set in the
  same script that commits its append, so a redelivered compress task finds nothing to do.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import redis

from sluice.settings import Settings

PREFIX = "sluice:"
HWM_KEY = PREFIX + "hwm"
INFLIGHT_KEY = PREFIX + "inflight"
STATS_KEY = PREFIX + "stats:records"


def state_key(bid: str) -> str:
    return f"{PREFIX}b:{bid}:state"


def payload_key(bid: str) -> str:
    return f"{PREFIX}b:{bid}:payload"


def groups_key(bid: str) -> str:
    return f"{PREFIX}b:{bid}:groups"


def pending_key(bid: str) -> str:
    return f"{PREFIX}b:{bid}:pending"


def piece_name(app: str, hour: str) -> str:
    return f"{app}|{hour}"


def split_piece(piece: str) -> tuple[str, str]:
    app, hour = piece.split("|")
    return app, hour


_HAND_OVER = """
local cur = redis.call('HGET', KEYS[1], ARGV[1]) or ''
if cur ~= ARGV[2] then return {0, cur} end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
if ARGV[6] == '1' then redis.call('SET', KEYS[4], ARGV[7]) end
redis.call('SET', KEYS[3], 'handed')
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
return {1, ''}
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


class Ledger:
    """The Redis side of the batch lifecycle, plus the claim-check payload store."""

    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self._hand_over = client.register_script(_HAND_OVER)
        self._split_commit = client.register_script(_SPLIT_COMMIT)

    # --- bridge side -------------------------------------------------------------------
    def high_water_mark(self, topic: str, partition: int) -> int | None:
        """Last offset of this partition already handed over, or None."""
        value = self.r.hget(HWM_KEY, f"{topic}:{partition}")
        return int(value) if value is not None else None

    def hand_over(self, bid: str, topic: str, partition: int, expected_hwm: int | None,
                  last: int, payload: bytes) -> bool:
        """Store the batch once and advance the high-water mark, atomically.

        False when the mark moved since it was read (another bridge handed these offsets
        over); the caller re-reads the mark and trims its batch.
        """
        in_redis = self.settings.claim_check == "redis"
        if not in_redis:
            _write_durably(self.spool_batch_path(bid), payload)
        ok, _ = self._hand_over(
            keys=[HWM_KEY, INFLIGHT_KEY, state_key(bid), payload_key(bid)],
            args=[f"{topic}:{partition}", "" if expected_hwm is None else str(expected_hwm),
                  str(last), bid, time.time(), "1" if in_redis else "0",
                  payload if in_redis else b""],
        )
        if not ok and not in_redis and self.state(bid) is None:
            # Nobody handed this id over (same id means same bytes), so the file is ours.
            self.spool_batch_path(bid).unlink(missing_ok=True)
        return bool(ok)

    def spool_batch_path(self, bid: str) -> Path:
        return self.settings.spool_dir / "batches" / f"{bid}.msgpack"

    # --- split side --------------------------------------------------------------------
    def state(self, bid: str) -> str | None:
        value = self.r.get(state_key(bid))
        return value.decode() if value is not None else None

    def load_payload(self, bid: str) -> bytes:
        if self.settings.claim_check == "redis":
            payload = self.r.get(payload_key(bid))
            if payload is None:
                raise LookupError(f"batch {bid} is handed over but its payload is missing from Redis")
            return payload
        return self.spool_batch_path(bid).read_bytes()

    def commit_split(self, bid: str, groups: dict[str, bytes]) -> bool:
        """Record the pieces of a handed-over batch; False if it was already split."""
        args: list[str | bytes] = []
        for piece, data in groups.items():
            args += [piece, data]
        done = self._split_commit(
            keys=[state_key(bid), groups_key(bid), pending_key(bid), payload_key(bid)], args=args)
        if self.settings.claim_check == "spool":
            self.spool_batch_path(bid).unlink(missing_ok=True)
        return bool(done)

    def pending_pieces(self, bid: str) -> list[str]:
        return sorted(p.decode() for p in self.r.smembers(pending_key(bid)))

    def pieces_data(self, bid: str, pieces: list[str]) -> list[bytes | None]:
        """Data of each piece; None for a piece already appended."""
        return self.r.hmget(groups_key(bid), pieces) if pieces else []

    def pending_sizes(self, bid: str) -> dict[str, int]:
        """Pending pieces of a batch and their sizes in bytes."""
        pieces = self.pending_pieces(bid)
        with self.r.pipeline(transaction=False) as pipe:
            for piece in pieces:
                pipe.hstrlen(groups_key(bid), piece)
            return dict(zip(pieces, pipe.execute()))

    # --- recovery ----------------------------------------------------------------------
    def stale_batches(self, older_than: float) -> list[str]:
        """Batches handed over more than `older_than` seconds ago and not yet fully archived."""
        cutoff = time.time() - older_than
        return [b.decode() for b in self.r.zrangebyscore(INFLIGHT_KEY, "-inf", cutoff)]

    def touch(self, bid: str) -> None:
        """Restart the redrive clock of a batch, so a backlog is redriven once, not every sweep."""
        self.r.zadd(INFLIGHT_KEY, {bid: time.time()}, xx=True)

    def inflight_count(self) -> int:
        return int(self.r.zcard(INFLIGHT_KEY))


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


def _write_durably(path: Path, data: bytes) -> None:
    """Write-then-rename with fsync, so a reader never sees a half-written batch."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
