"""The split packs the small pieces of each hour into one tail piece; big pieces stay their own."""

from __future__ import annotations

from sluice import schema
from sluice.frames import TailEntry, unpack_tail_piece
from sluice.stages import Piece, tail_pieces

H1, H2 = "2026010109", "2026010110"


def test_small_pieces_of_each_hour_become_one_tail_piece_and_big_ones_stay():
    pieces = {("big", H1): Piece(b"x" * 100 + b"\n", 1, (5, 5)), ("a", H1): Piece(b"a\n", 1, (10, 10)),
              ("b", H1): Piece(b"b1\nb2\n", 2, (3, 20)), ("a", H2): Piece(b"a2\n", 1, (7, 7))}
    out = tail_pieces(pieces, tail_piece_bytes=50)
    assert set(out) == {schema.app_hour("big", H1), schema.app_hour(schema.TAIL_APP, H1),
                        schema.app_hour(schema.TAIL_APP, H2)}
    assert out[schema.app_hour("big", H1)] == pieces[("big", H1)]
    packed, records, span = out[schema.app_hour(schema.TAIL_APP, H1)]
    assert records == 3 and span == (3, 20), "the tail piece spans its pieces"
    assert unpack_tail_piece(packed) == ([TailEntry("a", 2, 1, 10, 10), TailEntry("b", 6, 2, 3, 20)], b"a\nb1\nb2\n")


def test_zero_turns_the_tail_off():
    pieces = {("a", H1): Piece(b"a\n", 1, (0, 0))}
    assert tail_pieces(pieces, tail_piece_bytes=0) == {schema.app_hour("a", H1): pieces[("a", H1)]}
