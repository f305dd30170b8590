"""The work of the split and compress tasks, free of Celery, so the benchmark times the very
code the workers run."""

from __future__ import annotations

import collections

import zstandard

from sluice import schema
from sluice.appends import Appender, Frame
from sluice.batches import Batches
from sluice.frames import TailEntry, announce, announce_tail
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
                    bid: str, pieces: list[str], tail_piece_bytes: int = 0) -> int:
    """Compress the pieces still pending and append each exactly once; how many frames this
    call appended.

    A piece of `tail_piece_bytes` or more is a frame of its own, announced with the piece's id
    (sluice.frames), in a file of its app-hour. The smaller pieces of each hour are compressed
    together, as one tail frame in a tail file of that hour (sluice.tail): compressed together
    they lose less to frame overheads, and cost one file write and one commit entry, not one per app.
    """
    frames: list[Frame] = []
    small: dict[str, list[tuple[str, str, bytes, int]]] = collections.defaultdict(list)
    for piece, found in zip(pieces, batches.pieces_data(bid, pieces)):
        if found is None:  # appended by an earlier delivery
            continue
        data, nrecords = found
        app, hour = schema.parse_app_hour(piece)
        if len(data) < tail_piece_bytes:
            small[hour].append((app, piece, data, nrecords))
        else:
            frames.append(Frame.piece(app, hour, announce(schema.piece_id(bid, piece), cctx.compress(data)), nrecords))
    for hour, parts in small.items():
        entries = [TailEntry(app, len(data), nrecords) for app, _, data, nrecords in parts]
        data = announce_tail(bid, hour, entries, cctx.compress(b"".join(data for _, _, data, _ in parts)))
        frames.append(Frame(schema.TAIL_APP, hour, data, tuple((piece, n) for _, piece, _, n in parts)))
    return appender.append_many(bid, frames) if frames else 0
