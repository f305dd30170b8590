"""The work of the split and compress tasks, free of Celery, so the benchmark times the very
code the workers run."""

from __future__ import annotations

import collections

import zstandard

from sluice import schema
from sluice.appends import Appender, Frame
from sluice.batches import Batches
from sluice.frames import TailEntry, announce, announce_tail, pack_tail_piece, unpack_tail_piece
from sluice.kafka_batches import records
from sluice.records import Router
from sluice.schema import BatchState


def split_batch(batches: Batches, router: Router, bid: str, tail_piece_bytes: int = 0) -> None:
    """Group a handed-over batch into app-hour pieces and record them; no-op once split.

    The pieces under `tail_piece_bytes` of each hour become one tail piece (`tail_pieces`)."""
    if batches.state(bid) != BatchState.HANDED:
        return
    topic, partition, first, last = schema.parse_batch_id(bid)
    reasons: collections.Counter[str] = collections.Counter()
    groups = router.group(records(batches.load_payload(bid), first, last), topic, partition, reasons)
    # An empty last line makes join end each piece with a newline, without copying it again.
    pieces = {schema.app_hour(app, hour): (b"\n".join(lines + [b""]), len(lines))
              for (app, hour), lines in groups.items()}
    pieces = tail_pieces(pieces, tail_piece_bytes)
    batches.commit_split(bid, {piece: data for piece, (data, _) in pieces.items()},
                         {piece: n for piece, (_, n) in pieces.items()}, dict(reasons))


def tail_pieces(pieces: dict[str, tuple[bytes, int]], tail_piece_bytes: int) -> dict[str, tuple[bytes, int]]:
    """The pieces (app-hour: data, records), with those under `tail_piece_bytes` of each hour
    packed into one piece of the pseudo-app `schema.TAIL_APP` (sluice.tail): compressed as one
    frame, they lose less to frame overheads, and cost one file write and one commit, not one per app."""
    out: dict[str, tuple[bytes, int]] = {}
    small: dict[str, list[tuple[TailEntry, bytes]]] = collections.defaultdict(list)
    for piece, (data, n) in pieces.items():
        if len(data) < tail_piece_bytes:
            app, hour = schema.parse_app_hour(piece)
            small[hour].append((TailEntry(app, len(data), n), data))
        else:
            out[piece] = (data, n)
    for hour, parts in small.items():
        packed = pack_tail_piece([entry for entry, _ in parts], b"".join(data for _, data in parts))
        out[schema.app_hour(schema.TAIL_APP, hour)] = (packed, sum(entry.records for entry, _ in parts))
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


def compress_pieces(batches: Batches, appender: Appender, cctx: zstandard.ZstdCompressor,
                    bid: str, pieces: list[str]) -> int:
    """One frame per piece still pending, announced with the piece's id (sluice.frames), or for
    a tail piece with its apps' parts, and appended exactly once; how many this call appended."""
    frames = []
    for piece, found in zip(pieces, batches.pieces_data(bid, pieces)):
        if found is None:  # appended by an earlier delivery
            continue
        data, nrecords = found
        app, hour = schema.parse_app_hour(piece)
        if app == schema.TAIL_APP:
            entries, lines = unpack_tail_piece(data)
            frame = announce_tail(bid, hour, entries, cctx.compress(lines))
            frames.append(Frame(app, hour, frame, nrecords, tuple((e.app, e.records) for e in entries)))
        else:
            frames.append(Frame.piece(app, hour, announce(schema.piece_id(bid, piece), cctx.compress(data)), nrecords))
    return appender.append_many(bid, frames) if frames else 0
