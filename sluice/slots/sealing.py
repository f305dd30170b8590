"""The seal policy: when a slot file takes no more appends and becomes a sealed file to upload.

A slot is sealed when it is full (`seal_size_bytes`, also done by the commit that fills it,
sluice.slots.appends), or idle long enough: `seal_age_seconds` once its hour is over (the wait
catches late records), `seal_open_hour_age_seconds` while the hour still runs (a quiet app's
current hour becomes fetchable without cutting a busy app's hour into many files).
"""

from __future__ import annotations

import logging

import redis

from sluice.core import schema, scripts
from sluice.core.errors import FileBusy, LockLost, SpoolDamaged
from sluice.core.redis_client import server_time
from sluice.core.settings import Settings
from sluice.formats.records import hour_start
from sluice.formats.spool import SealedFile, Spool, locked_file
from sluice.slots.slot_leases import SlotLeases

log = logging.getLogger(__name__)


class Sealer:
    def __init__(self, client: redis.Redis, settings: Settings) -> None:
        self.r = client
        self.settings = settings
        self.spool = Spool(settings.spool_dir)
        self.leases = SlotLeases(client, settings)
        self._seal = client.register_script(scripts.SEAL)

    def seal_due(self, now: float | None = None) -> int:
        """Seal every slot that is full or idle long enough; how many were sealed.

        Idle is told by Redis's clock, which also stamped each append, so a sweeping host whose
        clock is off seals nothing early or late. The states of all slots are read in one round
        trip: a sweep runs every few seconds over every open app-hour."""
        now = server_time(self.r) if now is None else now
        sids = [raw.decode() for raw in self.r.smembers(schema.SLOTS)]
        with self.r.pipeline(transaction=False) as pipe:
            for sid in sids:
                pipe.hgetall(schema.slot_state(sid))
            states = pipe.execute()
        sealed = 0
        for sid, state in zip(sids, states):
            if not self._due(sid, state, now):
                continue
            token = self.leases.try_lock(sid)
            if token is None:
                continue  # being appended to right now, so not idle
            try:
                if self._due(sid, self.r.hgetall(schema.slot_state(sid)), now):
                    if self._seal_locked(sid, token):
                        sealed += 1
            finally:
                self.leases.unlock([sid], token)
        return sealed

    def _due(self, sid: str, state: dict[bytes, bytes], now: float) -> bool:
        if not state:
            return True  # stale registry entry; sealing it just drops the entry
        if int(state[b"size"]) >= self.settings.seal_size_bytes:
            return True
        _, hour, _ = schema.parse_slot_id(sid)
        hour_over = now >= hour_start(hour) + 3600
        idle = now - float(state[b"updated"])
        s = self.settings
        return idle >= (s.seal_age_seconds if hour_over else s.seal_open_hour_age_seconds)

    def _seal_locked(self, sid: str, token: str) -> SealedFile | None:
        app, hour, _ = schema.parse_slot_id(sid)
        state = self.r.hgetall(schema.slot_state(sid))
        if not state:
            self.r.srem(schema.SLOTS, sid)
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
            log.warning("slot %s: its file is locked by another process (frozen or dying); "
                        "a later sweep seals it", sid)
            return None
        except FileNotFoundError:
            if sealed.size:
                raise SpoolDamaged(f"{path} is missing; {sealed.size} bytes were committed") from None
            self._seal_state(sid, token, sealed)  # claimed but never written
            return None

    def _seal_state(self, sid: str, token: str, sealed: SealedFile) -> None:
        result = self._seal(keys=[schema.slot_lock(sid), schema.slot_state(sid), schema.SEALED, schema.SLOTS,
                                  schema.SEALED_RECORDS, schema.PENDING_OLDEST],
                            args=[token, sealed.entry, sealed.size, sid])
        if result == -1:
            raise LockLost(f"lease on slot {sid} expired while sealing")
