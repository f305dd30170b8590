"""The sealed-file registry: slot files that take no more appends and wait for upload, and the
upload plan recorded for each (see sluice.archive.uploader).

A sealed file enters `schema.SEALED` in the script that seals its slot (sluice.slots.sealing or the
commit that fills it, sluice.slots.appends) and leaves it, with its plan, once its object is archived.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from sluice.core import schema, scripts
from sluice.core.errors import Damaged
from sluice.formats.frames import PIECE_MAGIC, TAIL_MAGIC, units
from sluice.formats.spool import FileRange, SealedFile
from sluice.handover.batch_files import BatchFiles

if TYPE_CHECKING:  # `sluice fetch` imports this module and should start fast; it may need no Redis
    import redis


class SealedRegistry:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._forget = client.register_script(scripts.FORGET)

    def sealed_files(self) -> list[SealedFile]:
        return [SealedFile.from_entry(entry.decode(), int(size))
                for entry, size in self.r.hgetall(schema.SEALED).items()]

    def is_sealed(self, sealed: SealedFile) -> bool:
        """Still awaiting upload (not archived and forgotten since it was listed)."""
        return bool(self.r.hexists(schema.SEALED, sealed.entry))

    def upload_plan(self, sealed: SealedFile) -> str | None:
        plan = self.r.hget(schema.UPLOAD_PLAN, sealed.entry)
        return plan.decode() if plan is not None else None

    def plan_upload(self, sealed: SealedFile, plan: str) -> str:
        """Record how a sealed file is archived, unless a plan is recorded already; the plan in
        force. Decided once, so a repeated upload never decides differently."""
        if self.r.hsetnx(schema.UPLOAD_PLAN, sealed.entry, plan):
            return plan
        return self.upload_plan(sealed) or plan

    def planned(self) -> list[str]:
        """Every plan in force."""
        return [plan.decode() for plan in self.r.hvals(schema.UPLOAD_PLAN)]

    def forget(self, sealed: SealedFile) -> None:
        """The file is archived: drop it and its plan, and count it archived, at once."""
        self._forget(keys=[schema.SEALED, schema.UPLOAD_PLAN, schema.SEALED_RECORDS, schema.PENDING_OLDEST,
                           schema.ARCHIVED_RECORDS, schema.ARCHIVED_BYTES, schema.COUNTERS],
                     args=[sealed.entry, sealed.app])

    def upload_failed(self) -> None:
        self.r.hincrby(schema.COUNTERS, schema.Counter.UPLOADS_FAILED.value, 1)


def committed_files(client: redis.Redis, app: str, hour: str, n: int) -> list[tuple[str, int]]:
    """(fid, committed size) of every open and every sealed, not yet uploaded, file of an
    app-hour, read in one transaction: what a reader may read of the spool, without a lock."""
    with client.pipeline(transaction=True) as pipe:
        for k in range(n):
            pipe.hmget(schema.slot_state(schema.slot_id(app, hour, k)), "fid", "size")
        pipe.hgetall(schema.SEALED)
        *open_slots, sealed = pipe.execute()
    found = [(fid.decode(), int(size)) for fid, size in open_slots if fid is not None]
    for entry, size in sealed.items():
        entry_app, entry_hour, fid = schema.parse_sealed_entry(entry.decode())
        if (entry_app, entry_hour) == (app, hour):
            found.append((fid, int(size)))
    return found


def batch_in_flight(path: Path, size: int, files: BatchFiles) -> str | None:
    """A batch still in flight (its payload still in the spool) that this sealed file holds a
    piece of, or None. Such a file waits in the spool until that batch is done: the pieces of
    every batch in flight then lie in the spool, where a repair of a Redis that forgot them finds
    them (sluice.ops.repair), never only in the store."""
    seen: set[str] = set()
    fd = os.open(path, os.O_RDONLY)
    try:
        for unit in units(FileRange(fd, 0, size)):
            if unit.ident is None or unit.magic not in (PIECE_MAGIC, TAIL_MAGIC):
                continue
            bid, _ = schema.parse_piece_id(unit.ident, tail=unit.magic == TAIL_MAGIC)
            if bid not in seen:
                seen.add(bid)
                if files.payload_path(bid).exists():
                    return bid
    except Damaged:
        return None  # written before announcements: its upload reads and reports it
    finally:
        os.close(fd)
    return None
