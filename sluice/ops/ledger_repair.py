"""`sluice ledger show|reset`: look at the partition marks, and start a new incarnation of a
topic's marks by hand when its recreation went unnoticed (bridge.incarnation cannot tell a topic
deleted, recreated and refilled past the old mark within one check period)."""

from __future__ import annotations

from dataclasses import dataclass

from sluice.handover.marks import Marks


@dataclass(frozen=True)
class MarkRow:
    topic: str
    partition: int
    last: int | None  # last offset handed over in this incarnation
    fingerprint: str | None
    incarnation: int
    earlier: int  # records handed over by earlier incarnations


def show(marks: Marks, topic: str | None = None) -> list[MarkRow]:
    rows = []
    for t, p in marks.partitions(topic):
        mark = marks.mark(t, p)
        rows.append(MarkRow(t, p, mark.last, mark.fingerprint, mark.incarnation, marks.earlier(t, p)))
    return rows


def reset(marks: Marks, rows: list[MarkRow]) -> list[tuple[MarkRow, bool]]:
    """Start a new incarnation of each partition whose mark is still as shown: its records from
    then on are handed over as new, whatever their offsets. False where the mark moved since."""
    return [(row, marks.new_incarnation(row.topic, row.partition, row.last)) for row in rows]


def render(rows: list[MarkRow]) -> str:
    lines = [f"{'topic':<24}{'partition':>10}{'last offset':>14}{'incarnation':>13}{'earlier':>12}  fingerprint"]
    for r in rows:
        lines.append(f"{r.topic:<24}{r.partition:>10}{'-' if r.last is None else r.last:>14}{r.incarnation:>13}"
                     f"{r.earlier:>12}  {r.fingerprint or '-'}")
    return "\n".join(lines)
