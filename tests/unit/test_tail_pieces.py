"""The split packs the small pieces of each hour into one tail piece; big pieces stay their own."""

from __future__ import annotations

from sluice import schema
from sluice.frames import TailEntry, unpack_tail_piece
from sluice.stages import tail_pieces

H1, H2 = "2026010109", "2026010110"


def test_small_pieces_of_each_hour_become_one_tail_piece_and_big_ones_stay():
    pieces = {schema.app_hour("big", H1): (b"x" * 100 + b"\n", 1), schema.app_hour("a", H1): (b"a\n", 1),
              schema.app_hour("b", H1): (b"b1\nb2\n", 2), schema.app_hour("a", H2): (b"a2\n", 1)}
    out = tail_pieces(pieces, tail_piece_bytes=50)
    assert set(out) == {schema.app_hour("big", H1), schema.app_hour(schema.TAIL_APP, H1),
                        schema.app_hour(schema.TAIL_APP, H2)}
    assert out[schema.app_hour("big", H1)] == pieces[schema.app_hour("big", H1)]
    packed, records = out[schema.app_hour(schema.TAIL_APP, H1)]
    assert records == 3
    assert unpack_tail_piece(packed) == ([TailEntry("a", 2, 1), TailEntry("b", 6, 2)], b"a\nb1\nb2\n")


def test_zero_turns_the_tail_off():
    pieces = {schema.app_hour("a", H1): (b"a\n", 1)}
    assert tail_pieces(pieces, tail_piece_bytes=0) == pieces
