"""`sluice ls`: what the store holds, from its listings and the objects' indexes, without
decompressing anything: the apps present, or one app's hours with their objects, records and
compressed bytes."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sluice.archive.store import Store, hour_prefix, live_keys, read_index
from sluice.core.errors import Damaged
from sluice.formats.frames import UNKNOWN
from sluice.query.timewindow import hours_between


@dataclass
class HourListing:
    hour: str
    objects: int
    records: int | None  # None if an object has no index to count from (archived before indexes)
    compressed_bytes: int


def list_hours(store: Store, app: str, since: datetime, until: datetime) -> list[HourListing]:
    """The app's hours in the window that have objects: one listing per hour, one ranged read
    of each object's tail."""
    out = []
    for hour in hours_between(since, until):
        keys = live_keys(store.list(hour_prefix(app, hour)))
        if not keys:
            continue
        records: int | None = 0
        size_total = 0
        for key in keys:
            size = store.size(key)
            if size is None:
                continue  # replaced by a merge since it was listed
            size_total += size
            try:
                entries = read_index(store, key, size)
            except Damaged:
                records = None
                continue
            if records is not None and all(e.meta.records != UNKNOWN for e in entries):
                records += sum(e.meta.records for e in entries)
            else:
                records = None
        out.append(HourListing(hour, len(keys), records, size_total))
    return out


def render(rows: list[HourListing]) -> str:
    lines = [f"{'hour (UTC)':<14}{'objects':>9}{'records':>14}{'compressed':>16}"]
    for row in rows:
        hour = f"{row.hour[:4]}-{row.hour[4:6]}-{row.hour[6:8]} {row.hour[8:]}h"
        records = f"{row.records:,}" if row.records is not None else "?"
        lines.append(f"{hour:<14}{row.objects:>9}{records:>14}{row.compressed_bytes:>16,}")
    known = [r.records for r in rows if r.records is not None]
    total = f"{sum(known):,}" + ("+?" if len(known) < len(rows) else "")
    lines.append(f"{'total':<14}{sum(r.objects for r in rows):>9}{total:>14}"
                 f"{sum(r.compressed_bytes for r in rows):>16,}")
    return "\n".join(lines)
