"""The split task's work, free of Celery, so the benchmark times the very code the workers run:
a handed-over batch grouped into app-hour pieces, and the pieces bundled into compress tasks."""

from __future__ import annotations

import collections
import contextlib
import gc
import math
from typing import Iterator, NamedTuple

from sluice.core import schema
from sluice.core.schema import BatchState
from sluice.formats.frames import TailPiece
from sluice.formats.records import Router
from sluice.handover.batches import Batches
from sluice.handover.kafka_batches import records


def split_batch(batches: Batches, router: Router, bid: str, tail_piece_bytes: int = 0) -> None:
    """Group a handed-over batch into app-hour pieces and record them; no-op once split.

    The pieces under `tail_piece_bytes` of each hour become one tail piece (`pieces_of`)."""
    if batches.state(bid) != BatchState.HANDED:
        return
    topic, partition, first, last = schema.parse_batch_id(bid)
    reasons: collections.Counter[str] = collections.Counter()
    spans: dict[tuple[str, str], tuple[float, float]] = {}
    with _no_cycle_collection():
        groups = router.group(records(batches.load_payload(bid), first, last), topic, partition, reasons, spans)
        pieces = pieces_of(groups, spans, tail_piece_bytes)
        del groups
    batches.commit_split(bid, {name: p.data for name, p in pieces.items()},
                         {name: p.records for name, p in pieces.items()}, dict(reasons),
                         {name: p.span for name, p in pieces.items()})


@contextlib.contextmanager
def _no_cycle_collection() -> Iterator[None]:
    """Python's cyclic garbage collector off while a batch is grouped into pieces: that creates a
    few lists and tuples per app-hour and no reference cycles, and with thousands of apps the
    collector walked them again and again (a third of the split's CPU at 5,000 apps).
    Process-wide, so it is turned back on by whoever turned it off (threads may overlap)."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


class Piece(NamedTuple):
    """An app-hour's lines of one batch, how many, and their event-time span in ms."""

    data: bytes
    records: int
    span: tuple[int, int]


def pieces_of(groups: dict[tuple[str, str], list[bytes]], spans: dict[tuple[str, str], tuple[float, float]],
              tail_piece_bytes: int) -> dict[str, Piece]:
    """The pieces of a batch by name ("app|hour"), from its lines grouped by (app, hour) and each
    group's event-time span in seconds: a group's lines, each ended by a newline, or, for groups
    under `tail_piece_bytes` (lines and newlines), one piece per hour of the pseudo-app
    `schema.TAIL_APP` (sluice.archive.tail) that packs them. Compressed as one frame, small groups lose
    less to frame overheads, and cost one file write and one commit, not one per app; they are
    packed line by line, never joined on their own first."""
    out: dict[str, Piece] = {}
    small: dict[str, TailPiece] = {}
    for (app, hour), lines in groups.items():
        lo, hi = spans[(app, hour)]
        span = (math.floor(lo * 1000), math.ceil(hi * 1000))
        size = sum(map(len, lines)) + len(lines)
        if size < tail_piece_bytes:
            tail = small.get(hour)
            if tail is None:
                tail = small[hour] = TailPiece()
            tail.add(app, lines, size, *span)
        else:
            records = len(lines)
            lines.append(b"")  # so that join ends the piece with a newline, without copying it again
            out[schema.app_hour(app, hour)] = Piece(b"\n".join(lines), records, span)
    for hour, tail in small.items():
        out[schema.app_hour(schema.TAIL_APP, hour)] = Piece(tail.packed(), tail.records, (tail.min_ms, tail.max_ms))
    return out


def bundle_pieces(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Group pieces into compress tasks of about max_bytes each.

    A batch of a Zipf mix splits into hundreds of pieces, mostly tiny; one task per piece would
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
