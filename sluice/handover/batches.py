"""The batch state machine in Redis: handed over (bridge) -> split (split task) -> gone (the
commit of its last piece, sluice.slots.appends).

Every transition is one atomic script (sluice.core.scripts), so a crash between any two steps
leaves a state from which a redelivered task, or the redrive sweep, finishes the work without
doing any part of it twice: a split batch keeps a *pending* set of its app-hour pieces, and a
piece leaves that set in the same script that commits its append, so a redelivered compress
task finds nothing to do.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence

import redis

from sluice.core import schema, scripts
from sluice.core.errors import PayloadMissing
from sluice.core.redis_client import server_time
from sluice.core.schema import BatchState
from sluice.core.settings import Settings
from sluice.handover.batch_files import BatchFiles, BytesLike, write_durably


class Batches:
    """Hand-over, split commit, and what is still in flight."""

    def __init__(self, client: redis.Redis, settings: Settings, guarded: bool = True) -> None:
        """`guarded=False`: the split commits even before Redis's state is checked against the
        spool (scripts.GUARD); for sluice.ops.repair alone."""
        self.r = client
        self.settings = settings
        self.files = BatchFiles(settings.spool_dir)
        self._hand_over = client.register_script(scripts.HAND_OVER)
        self._split_commit = client.register_script(scripts.SPLIT_COMMIT if guarded else scripts.REPAIR_SPLIT_COMMIT)

    @property
    def _in_redis(self) -> bool:
        return self.settings.claim_check == "redis"

    # --- bridge side -------------------------------------------------------------------
    def hand_over(self, bid: str, topic: str, partition: int, expected_hwm: int | None,
                  last: int, payload: Sequence[BytesLike], fingerprint: str = "",
                  oldest_ms: int | None = None) -> bool:
        """Store the batch (the concatenation of `payload`) once and advance the partition's
        mark, atomically. `oldest_ms`: the Kafka timestamp of its first record (now if unknown),
        from which the age of what is not yet fetchable is told.

        False when the mark moved since it was read (another bridge handed these offsets
        over); the caller re-reads the mark and trims its batch.
        """
        size = self.in_flight_share(sum(len(part) for part in payload))
        if not self._in_redis:
            self.files.write_payload(bid, payload)
        ok, _ = self._hand_over(
            keys=[schema.HWM, schema.INFLIGHT, schema.batch_state(bid), schema.batch_payload(bid),
                  schema.FINGERPRINT, schema.INFLIGHT_BYTES, schema.BATCH_BYTES, schema.INFLIGHT_OLDEST],
            args=[schema.partition_field(topic, partition), "" if expected_hwm is None else str(expected_hwm),
                  str(last), bid, "1" if self._in_redis else "0",
                  b"".join(payload) if self._in_redis else b"", fingerprint, size,
                  oldest_ms if oldest_ms is not None else int(time.time() * 1000)],
        )
        if not ok and not self._in_redis and self.state(bid) is None:
            # Nobody handed this id over (same id means same bytes), so the file is ours.
            self.files.drop_payload(bid)
        return bool(ok)

    @staticmethod
    def in_flight_share(payload_bytes: int) -> int:
        """What a batch of this many payload bytes is counted as in flight from its hand-over
        until its split says better (SPLIT_COMMIT): its payload, and pieces about as large, which
        the spool will hold beside it until the batch is done."""
        return 2 * payload_bytes

    # --- split side --------------------------------------------------------------------
    def state(self, bid: str) -> BatchState | None:
        value = self.r.get(schema.batch_state(bid))
        return BatchState(value.decode()) if value is not None else None

    def load_payload(self, bid: str) -> BytesLike:
        """The batch's bytes: from Redis, or its spool file mapped into memory."""
        if self._in_redis:
            payload = self.r.get(schema.batch_payload(bid))
            if payload is None:
                raise PayloadMissing(f"batch {bid} is handed over but its payload is missing from Redis")
            return payload
        return self.files.map_payload(bid)

    def commit_split(self, bid: str, groups: dict[str, bytes], records: dict[str, int] | None = None,
                     quarantined: dict[str, int] | None = None,
                     spans: dict[str, tuple[int, int]] | None = None) -> bool:
        """Record the pieces of a handed-over batch (and how many records, lines, each holds),
        and count its quarantined records by reason; False if it was already split.

        The pieces are written once, to one file of the spool (durable before Redis refers to
        it); Redis keeps only where each lies (`schema.piece_ref`). Each delivery writes a file
        of its own, so a duplicate that loses the race removes just its own. The payload stays
        until the batch's last piece is committed (sluice.slots.appends): a Redis that forgets
        the split is repaired from it (sluice.ops.repair).
        """
        token = uuid.uuid4().hex[:12]
        path = self.files.pieces_path(bid, token)
        reasons = quarantined or {}
        payload = 0 if self._in_redis else self.files.payload_size(bid)
        args: list[str | int] = [bid, payload + sum(len(data) for data in groups.values()), len(reasons)]
        for reason, count in reasons.items():
            args += [reason, count]
        offset = 0
        for piece, data in groups.items():
            count = records[piece] if records is not None else data.count(b"\n")
            args += [piece, schema.piece_ref(token, offset, len(data), count, spans.get(piece) if spans else None)]
            offset += len(data)
        write_durably(path, groups.values())
        # If this raises, the script may have run all the same (a reply lost on the way back):
        # the file is left for the batch's end to remove with its others (drop_pieces).
        done = self._split_commit(
            keys=[schema.batch_state(bid), schema.batch_groups(bid), schema.batch_pending(bid),
                  schema.batch_payload(bid), schema.QUARANTINED, schema.INFLIGHT_BYTES, schema.BATCH_BYTES],
            args=args)
        if not done:
            path.unlink(missing_ok=True)
        return bool(done)

    def pending_pieces(self, bid: str) -> list[str]:
        return sorted(p.decode() for p in self.r.smembers(schema.batch_pending(bid)))

    def _refs(self, bid: str, pieces: list[str]) -> list[schema.PieceRef | None]:
        refs = self.r.hmget(schema.batch_groups(bid), pieces) if pieces else []
        return [schema.parse_piece_ref(ref) if ref is not None else None for ref in refs]

    def pieces_data(self, bid: str, pieces: list[str]) -> list[tuple[bytes, int, tuple[int, int] | None] | None]:
        """Data, record count and event-time span (ms; None if not known) of each piece; None
        for a piece already appended."""
        refs = self._refs(bid, pieces)
        datas = self.files.read_pieces(bid, [(ref.token, ref.offset, ref.length) if ref else None for ref in refs])
        return [None if data is None or ref is None else
                (data, ref.records if ref.records is not None else data.count(b"\n"), ref.span)
                for ref, data in zip(refs, datas)]

    def pending_sizes(self, bid: str) -> dict[str, int]:
        """Pending pieces of a batch and their sizes in bytes."""
        pieces = self.pending_pieces(bid)
        return {piece: ref.length for piece, ref in zip(pieces, self._refs(bid, pieces)) if ref}

    # --- in flight ---------------------------------------------------------------------
    def stale(self, older_than: float) -> list[str]:
        """Batches handed over more than `older_than` seconds ago (by Redis's clock, as the
        hand-over recorded them) and not yet fully archived."""
        cutoff = server_time(self.r) - older_than
        return [b.decode() for b in self.r.zrangebyscore(schema.INFLIGHT, "-inf", cutoff)]

    def in_flight(self, bid: str) -> bool:
        return self.r.zscore(schema.INFLIGHT, bid) is not None

    def touch(self, bid: str) -> None:
        """Restart the redrive clock of a batch, so a backlog is redriven once, not every sweep."""
        self.r.zadd(schema.INFLIGHT, {bid: server_time(self.r)}, xx=True)

    def inflight_count(self) -> int:
        return int(self.r.zcard(schema.INFLIGHT))

    def inflight_bytes(self) -> int:
        """Bytes of the handed-over batches not yet all appended: payloads and pieces in Redis
        or the spool (the backpressure bound)."""
        return int(self.r.get(schema.INFLIGHT_BYTES) or 0)

    def drop_orphans(self, older_than: float) -> int:
        """Batch files of batches no longer in flight; see BatchFiles.drop_orphans."""
        return self.files.drop_orphans(older_than, self.in_flight)
