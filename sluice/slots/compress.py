"""The compress task's work, free of Celery, so the benchmark times the very code the workers
run: each pending piece of a batch becomes one announced zstd frame, appended to its slot file."""

from __future__ import annotations

import zstandard

from sluice.core import schema
from sluice.formats.frames import Meta, announce, announce_tail, tail_piece_parts
from sluice.formats.records import hour_start
from sluice.handover.batches import Batches
from sluice.slots.appends import Appender, Frame


def compress_pieces(batches: Batches, appender: Appender, cctx: zstandard.ZstdCompressor,
                    bid: str, pieces: list[str]) -> int:
    """One frame per piece still pending, announced with the piece's id (sluice.formats.frames), or for
    a tail piece with its apps' parts, and appended exactly once; how many this call appended."""
    frames = []
    for piece, found in zip(pieces, batches.pieces_data(bid, pieces)):
        if found is None:  # appended by an earlier delivery
            continue
        data, nrecords, span = found
        app, hour = schema.parse_app_hour(piece)
        start_ms = int(hour_start(hour) * 1000)  # a piece split before spans were kept: its whole hour
        lo, hi = span if span is not None else (start_ms, start_ms + 3_600_000 - 1)
        if app == schema.TAIL_APP:
            # its entries go into the announcement as the split packed them
            count, entries, lines = tail_piece_parts(data)
            frame = announce_tail(bid, hour, count, entries, cctx.compress(lines), Meta(len(lines), nrecords, lo, hi))
        else:
            frame = announce(schema.piece_id(bid, piece), cctx.compress(data), Meta(len(data), nrecords, lo, hi))
        frames.append(Frame(app, hour, frame, nrecords))
    return appender.append_many(bid, frames) if frames else 0
