"""The work of the split and compress tasks, free of Celery, so the benchmark times the very
code the workers run."""

from __future__ import annotations

import zstandard

from sluice.batch import parse_batch_id
from sluice.frames import announce
from sluice.kafka_batches import records
from sluice.ledger import Ledger, piece_name, split_piece
from sluice.records import Router
from sluice.slots import Frame, Slots


def split_batch(ledger: Ledger, router: Router, bid: str) -> None:
    """Group a handed-over batch into (app, hour) pieces and record them; no-op once split."""
    if ledger.state(bid) != "handed":
        return
    topic, partition, first, last = parse_batch_id(bid)
    groups = router.group(records(ledger.load_payload(bid), first, last), topic, partition)
    pieces = {piece_name(app, hour): lines for (app, hour), lines in groups.items()}
    # An empty last line makes join end each piece with a newline, without copying it again.
    ledger.commit_split(bid, {piece: b"\n".join(lines + [b""]) for piece, lines in pieces.items()},
                        {piece: len(lines) for piece, lines in pieces.items()})


def compress_pieces(ledger: Ledger, slots: Slots, cctx: zstandard.ZstdCompressor,
                    bid: str, pieces: list[str]) -> int:
    """One frame per piece still pending, announced with the piece's id (sluice.frames) and
    appended exactly once; how many this call appended."""
    frames = []
    for piece, found in zip(pieces, ledger.pieces_data(bid, pieces)):
        if found is None:  # appended by an earlier delivery
            continue
        data, records = found
        app, hour = split_piece(piece)
        frame = announce(f"{bid}|{piece}", cctx.compress(data))
        frames.append(Frame(app, hour, frame, records))
    return slots.append_many(bid, frames) if frames else 0
