"""The split packs the small pieces of each hour into one tail piece; big pieces stay their own."""

from __future__ import annotations

from sluice.core import schema
from sluice.formats.frames import TailEntry, unpack_tail_piece
from sluice.handover.split import Piece, pieces_of

H1, H2 = "2026010109", "2026010110"


def test_small_pieces_of_each_hour_become_one_tail_piece_and_big_ones_stay():
    groups = {("big", H1): [b"x" * 100], ("a", H1): [b"a"], ("b", H1): [b"b1", b"b2"], ("a", H2): [b"a2"]}
    spans = {("big", H1): (5.0, 5.0), ("a", H1): (10.0, 10.0), ("b", H1): (3.0, 20.5), ("a", H2): (7.0, 7.0)}
    out = pieces_of(groups, spans, tail_piece_bytes=50)
    assert set(out) == {schema.app_hour("big", H1), schema.app_hour(schema.TAIL_APP, H1),
                        schema.app_hour(schema.TAIL_APP, H2)}
    assert out[schema.app_hour("big", H1)] == Piece(b"x" * 100 + b"\n", 1, (5000, 5000))
    packed, records, span = out[schema.app_hour(schema.TAIL_APP, H1)]
    assert records == 3 and span == (3000, 20500), "the tail piece spans its pieces, in ms"
    assert unpack_tail_piece(packed) == ([TailEntry("a", 2, 1, 10000, 10000), TailEntry("b", 6, 2, 3000, 20500)],
                                         b"a\nb1\nb2\n")
    assert unpack_tail_piece(out[schema.app_hour(schema.TAIL_APP, H2)].data) == (
        [TailEntry("a", 3, 1, 7000, 7000)], b"a2\n")


def test_zero_turns_the_tail_off():
    out = pieces_of({("a", H1): [b"a"]}, {("a", H1): (0.0, 0.0)}, tail_piece_bytes=0)
    assert out == {schema.app_hour("a", H1): Piece(b"a\n", 1, (0, 0))}
