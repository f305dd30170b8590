"""Times as `sluice fetch` takes them, and the hours a window covers."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone

from sluice.formats.records import parse_timestamp

_RELATIVE = re.compile(r"-?(\d+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """ISO 8601 (UTC if no zone), epoch seconds, 'now', or a relative '-15m' / '2h' / '1d' ago."""
    now = now or datetime.now(timezone.utc)
    text = text.strip()
    if text == "now":
        return now
    if match := _RELATIVE.fullmatch(text):
        try:
            return now - timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
        except OverflowError:
            raise ValueError(f"{text!r} reaches back before year 1") from None
    seconds = parse_timestamp(text)
    if seconds is None:
        raise ValueError(f"cannot read {text!r} as a time: use ISO 8601, epoch seconds, 'now' or '-2h'")
    return datetime.fromtimestamp(seconds, timezone.utc)


def hours_between(since: datetime, until: datetime) -> list[str]:
    """Every YYYYMMDDHH hour that overlaps [since, until)."""
    if until <= since:
        return []
    hour = since.astimezone(timezone.utc).replace(minute=0, second=0, microsecond=0)
    hours = []
    while hour < until:
        hours.append(hour.strftime("%Y%m%d%H"))
        hour += timedelta(hours=1)
    return hours
