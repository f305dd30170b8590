"""The pure parts of sluice.ops.repair: which piece an announced frame holds, and which batches
share offsets (a payload that overlaps others is set aside, not restored)."""

from __future__ import annotations

from sluice.core import schema
from sluice.formats.frames import PIECE_MAGIC, TAIL_MAGIC
from sluice.ops.repair import _overlap, _piece_of


def test_a_frame_names_its_batch_and_piece():
    bid = schema.batch_id("logs", 3, 100, 199, 2)
    assert _piece_of(f"{bid}|billing|2026120805", PIECE_MAGIC) == (bid, "billing|2026120805")
    assert _piece_of(f"{bid}|2026120805", TAIL_MAGIC) == (bid, schema.app_hour(schema.TAIL_APP, "2026120805"))


def test_batches_overlap_only_in_the_same_incarnation():
    a, b = schema.batch_id("logs", 0, 0, 99), schema.batch_id("logs", 0, 50, 149)
    assert _overlap(a, b) and _overlap(b, a)
    assert not _overlap(a, schema.batch_id("logs", 0, 100, 199))
    assert not _overlap(a, schema.batch_id("logs", 0, 0, 99, 1))
