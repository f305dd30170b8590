"""The work of the split and compress tasks, free of Celery, so the benchmark times the very
code the workers run."""

from __future__ import annotations

import collections

import zstandard

from sluice import schema
from sluice.appends import Appender, Frame
from sluice.batches import Batches
from sluice.frames import announce
from sluice.kafka_batches import records
from sluice.records import Router
from sluice.schema import BatchState


def split_batch(batches: Batches, router: Router, bid: str) -> None:
    """Group a handed-over batch into app-hour pieces and record them; no-op once split."""
    if batches.state(bid) != BatchState.HANDED:
        return
    topic, partition, first, last = schema.parse_batch_id(bid)
    reasons: collections.Counter[str] = collections.Counter()
    groups = router.group(records(batches.load_payload(bid), first, last), topic, partition, reasons)
    pieces = {schema.app_hour(app, hour): lines for (app, hour), lines in groups.items()}
    # An empty last line makes join end each piece with a newline, without copying it again.
    batches.commit_split(bid, {piece: b"\n".join(lines + [b""]) for piece, lines in pieces.items()},
                         {piece: len(lines) for piece, lines in pieces.items()}, dict(reasons))


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


def compress_pieces(batches: Batches, appender: Appender, cctx: zstandard.ZstdCompressor,
                    bid: str, pieces: list[str]) -> int:
    """One frame per piece still pending, announced with the piece's id (sluice.frames) and
    appended exactly once; how many this call appended."""
    frames = []
    for piece, found in zip(pieces, batches.pieces_data(bid, pieces)):
        if found is None:  # appended by an earlier delivery
            continue
        data, nrecords = found
        app, hour = schema.parse_app_hour(piece)
        frame = announce(schema.piece_id(bid, piece), cctx.compress(data))
        frames.append(Frame(app, hour, frame, nrecords))
    return appender.append_many(bid, frames) if frames else 0
