"""Slot leases: the Redis lock each slot file is written and sealed under.

A lease is `schema.slot_lock(sid)` holding a random token with an expiry longer than the hard
time limit of any task that holds it (Settings checks), so a stalled writer is killed by Celery
before anyone else can take its slot. A lease alone cannot fence a frozen writer; the kernel
lock on the file does that (sluice.formats.spool), and a writer re-checks its lease under it.
"""

from __future__ import annotations

import uuid

import redis

from sluice.core import schema, scripts
from sluice.core.settings import Settings


class SlotLeases:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.lease_ms = int(settings.lock_lease_seconds * 1000)
        self._release = client.register_script(scripts.RELEASE)

    def try_lock(self, sid: str) -> str | None:
        """Take one slot's lease; its token, or None if someone holds it."""
        token = uuid.uuid4().hex
        if self.r.set(schema.slot_lock(sid), token, nx=True, px=self.lease_ms):
            return token
        return None

    def unlock(self, sids: list[str], token: str) -> None:
        """Release those of these leases that are still ours; one round trip."""
        if sids:
            self._release(keys=[schema.slot_lock(sid) for sid in sids], args=[token])
