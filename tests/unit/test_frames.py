"""Announced zstd frames: read back piece by piece, and still plain zstd to everyone else."""

from __future__ import annotations

import io
import subprocess

import pytest
import zstandard

from sluice.formats.frames import (
    Block,
    Damaged,
    IndexEntry,
    Meta,
    TailEntry,
    TailPiece,
    announce,
    announce_gathered,
    announce_tail,
    index,
    index_entries,
    parse_index,
    read_frames,
    tail_frames,
    tail_piece_parts,
    unpack_tail_piece,
)

CCTX = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True)  # as compress writes them


def stream(*pieces: tuple[str, bytes]) -> bytes:
    return b"".join(announce(ident, CCTX.compress(data), meta(data)) for ident, data in pieces)


def meta(data: bytes, lo: int = 0, hi: int = 3_600_000) -> Meta:
    return Meta(len(data), data.count(b"\n"), lo, hi)


def pairs(blocks) -> list[tuple[str | None, bytes]]:
    return [(b.ident, b.data) for b in blocks]


PIECES = [("logs:0:0-9|a|2026010100", b"one\ntwo\n"), ("logs:1:5-7@1|a|2026010100", b"three\n"),
          ("logs:0:10-19|a|2026010100", b"")]


def test_each_piece_comes_back_with_its_id():
    assert pairs(read_frames(io.BytesIO(stream(*PIECES)))) == PIECES


def test_the_zstd_cli_reads_the_same_lines():
    out = subprocess.run(["zstd", "-dcq"], input=stream(*PIECES), capture_output=True, check=True).stdout
    assert out == b"one\ntwo\nthree\n"


def test_other_skippable_frames_are_passed_over():
    other = (0x184D2A5E).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyz"
    data = stream(PIECES[0]) + other + stream(PIECES[1])
    assert pairs(read_frames(io.BytesIO(data))) == PIECES[:2]


def test_a_truncated_stream_gives_what_is_whole_then_raises():
    data = stream(*PIECES[:2])
    frames = read_frames(io.BytesIO(data[:-3]))
    assert next(frames)[:2] == PIECES[0]
    with pytest.raises(Damaged):
        next(frames)


def test_a_corrupt_frame_raises():
    data = bytearray(stream(PIECES[0]))
    data[-6:-2] = b"\x00\x00\x00\x00"
    with pytest.raises(Damaged):
        pairs(read_frames(io.BytesIO(bytes(data))))


def test_plain_frames_after_announced_ones_are_read_as_a_stream():
    data = stream(PIECES[0]) + CCTX.compress(b"old\nlines") + CCTX.compress(b" more\n")
    assert pairs(read_frames(io.BytesIO(data))) == [PIECES[0], (None, b"old\nlines more\n")]


def tail(bid: str, parts: list[tuple[str, bytes]], lines: bytes | None = None) -> bytes:
    """A tail frame of these (app, newline-ended lines), as compress makes it; `lines`: what its
    zstd frame holds instead of the parts' data."""
    piece = TailPiece()
    for app, data in parts:
        piece.add(app, data.split(b"\n")[:-1], len(data), 0, 1)
    count, entries, data = tail_piece_parts(piece.packed())
    meta = Meta(len(data), piece.records, piece.min_ms, piece.max_ms)
    return announce_tail(bid, "2026010100", count, entries, CCTX.compress(data if lines is None else lines), meta)


def test_a_tail_frame_gives_one_app_its_part_with_the_piece_id_and_skips_frames_without_it():
    data = (tail("logs:0:0-9", [("a", b"a1\n"), ("b", b"b1\nb2\n")]) + stream(PIECES[1])
            + tail("logs:0:10-19", [("c", b"c1\n")]) + tail("logs:0:20-29", [("b", b"b3\n")]))
    assert pairs(read_frames(io.BytesIO(data), app="b")) == [
        ("logs:0:0-9|b|2026010100", b"b1\nb2\n"), PIECES[1], ("logs:0:20-29|b|2026010100", b"b3\n")]
    assert pairs(read_frames(io.BytesIO(data))) == [PIECES[1]], "no app asked for: tail frames are passed over"
    out = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=True).stdout
    assert out == b"a1\nb1\nb2\nthree\nc1\nb3\n", "every zstd reader reads every line"


def test_tail_frames_gives_entries_and_data_and_refuses_what_does_not_add_up():
    data = tail("logs:0:0-9", [("a", b"a1\n"), ("b", b"b1\nb2\n")])
    entries = [TailEntry("a", 3, 1, 0, 1), TailEntry("b", 6, 2, 0, 1)]
    assert list(tail_frames(io.BytesIO(data))) == [(entries, b"a1\nb1\nb2\n")]
    # entries of 3 and 7 bytes: one byte more than there is
    bad = tail("logs:0:0-9", [("a", b"a1\n"), ("b", b"b1\nb2\n\n")], lines=b"a1\nb1\nb2\n")
    with pytest.raises(Damaged):
        list(tail_frames(io.BytesIO(bad)))
    with pytest.raises(Damaged):
        list(tail_frames(io.BytesIO(stream(PIECES[0]))))  # not a tail file


def test_a_tail_piece_packs_and_unpacks_and_a_damaged_one_is_refused():
    entries = [TailEntry("a", 3, 1, 0, 1), TailEntry("b", 6, 2, 0, 1)]
    tail = TailPiece()
    tail.add("a", [b"a1"], 3, 0, 1)
    tail.add("b", [b"b1", b"b2"], 6, 0, 1)
    packed = tail.packed()
    assert unpack_tail_piece(packed) == (entries, b"a1\nb1\nb2\n")
    with pytest.raises(Damaged):
        unpack_tail_piece(packed[:-1])  # entries add up to more than there is
    with pytest.raises(Damaged):
        unpack_tail_piece(packed[:9])  # cut inside the entries


def test_a_gathered_frame_says_which_bytes_came_from_which_tail_file():
    data = announce_gathered([("2026010100-00000000000000aa", 3), ("2026010100-ffffffffffffffff", 6)],
                             CCTX.compress(b"a1\na2\na3a4\n"), Meta(11, 3, 5, 7))
    assert list(read_frames(io.BytesIO(data))) == [
        Block(None, b"a1\na2\na3a4\n", (("00000000000000aa", 3), ("ffffffffffffffff", 6)), (5, 7), 3)]


def test_duckdb_reads_an_archive_of_announced_frames(tmp_path):
    import duckdb

    path = tmp_path / "billing.f1.jsonl.zst"
    path.write_bytes(stream(("a|billing|h", b'{"app":"billing","n":1}\n{"app":"billing","n":2}\n'),
                            ("b|billing|h", b'{"app":"billing","n":3}\n')))
    assert duckdb.sql(f"select count(*), sum(n) from read_json_auto('{path}')").fetchall() == [(3, 6)]


# --------------------------------------------------------------------------- the index


def indexed(*pieces: tuple[str, bytes, int, int]) -> tuple[bytes, list]:
    """An object of these pieces (id, lines, min ms, max ms) and its index entries."""
    body, entries = b"", []
    for ident, data, lo, hi in pieces:
        unit = announce(ident, CCTX.compress(data), meta(data, lo, hi))
        entries.append(IndexEntry(len(body), len(unit), meta(data, lo, hi)))
        body += unit
    return body + index(entries), entries


OBJECT, ENTRIES = indexed(("b:0|a|h", b"one\ntwo\n", 0, 10), ("b:1|a|h", b"three\n", 20, 30),
                          ("b:2|a|h", b"four\n", 40, 50))


def test_the_index_is_found_from_the_tail_and_lists_every_frame():
    assert parse_index(OBJECT[-200:], len(OBJECT)) == ENTRIES
    assert index_entries(io.BytesIO(OBJECT), 0) == ENTRIES, "the same entries as walking the announcements"
    assert pairs(read_frames(io.BytesIO(OBJECT))) == [("b:0|a|h", b"one\ntwo\n"), ("b:1|a|h", b"three\n"),
                                                     ("b:2|a|h", b"four\n")], "readers pass over it"
    out = subprocess.run(["zstd", "-dcq"], input=OBJECT, capture_output=True, check=True).stdout
    assert out == b"one\ntwo\nthree\nfour\n"


def test_a_window_skips_frames_by_their_announcements():
    blocks = read_frames(io.BytesIO(OBJECT), window=(15, 35))
    assert pairs(blocks) == [("b:1|a|h", b"three\n")]


def flip(data: bytes, at: int) -> bytes:
    out = bytearray(data)
    out[at] ^= 0x01
    return bytes(out)


FOOTER = 12
ENTRY = 36


@pytest.mark.parametrize("damage", [
    lambda d: d[:-1],  # truncated: no footer
    lambda d: flip(d, len(d) - 1),  # signature
    lambda d: flip(d, len(d) - 5),  # CRC
    lambda d: flip(d, len(d) - FOOTER),  # entry count
    lambda d: d[:-(FOOTER + 3 * ENTRY + 8)] + b"\0" * 8 + d[-(FOOTER + 3 * ENTRY):],  # index frame header
    lambda d: flip(d, len(d) - FOOTER - 3 * ENTRY),  # first offset
    lambda d: flip(d, len(d) - FOOTER - 2 * ENTRY + 8),  # a length
    lambda d: flip(d, len(d) - FOOTER - ENTRY + 12),  # a size (CRC catches it)
    lambda d: b"\0" * 10 + d,  # the table points short of where the index starts
], ids=["truncated", "signature", "crc", "count", "header", "offset", "length", "size", "shifted"])
def test_an_index_that_cannot_be_trusted_is_refused(damage):
    damaged = damage(OBJECT)
    with pytest.raises(Damaged):
        parse_index(damaged[-400:], len(damaged))


def test_an_object_without_an_index_says_so():
    with pytest.raises(Damaged, match="no index"):
        parse_index(stream(*PIECES)[-100:], len(stream(*PIECES)))
