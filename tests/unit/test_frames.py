"""Announced zstd frames: read back piece by piece, and still plain zstd to everyone else."""

from __future__ import annotations

import io
import subprocess

import pytest
import zstandard

from sluice.frames import Damaged, announce, read_frames

CCTX = zstandard.ZstdCompressor(write_content_size=True, write_checksum=True)  # as compress writes them


def stream(*pieces: tuple[str, bytes]) -> bytes:
    return b"".join(announce(ident, CCTX.compress(data)) for ident, data in pieces)


PIECES = [("logs:0:0-9|a|2026010100", b"one\ntwo\n"), ("logs:1:5-7@1|a|2026010100", b"three\n"),
          ("logs:0:10-19|a|2026010100", b"")]


def test_each_piece_comes_back_with_its_id():
    assert list(read_frames(io.BytesIO(stream(*PIECES)))) == PIECES


def test_the_zstd_cli_reads_the_same_lines():
    out = subprocess.run(["zstd", "-dcq"], input=stream(*PIECES), capture_output=True, check=True).stdout
    assert out == b"one\ntwo\nthree\n"


def test_other_skippable_frames_are_passed_over():
    other = (0x184D2A5E).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"xyz"
    data = stream(PIECES[0]) + other + stream(PIECES[1])
    assert list(read_frames(io.BytesIO(data))) == PIECES[:2]


def test_a_truncated_stream_gives_what_is_whole_then_raises():
    data = stream(*PIECES[:2])
    frames = read_frames(io.BytesIO(data[:-3]))
    assert next(frames) == PIECES[0]
    with pytest.raises(Damaged):
        next(frames)


def test_a_corrupt_frame_raises():
    data = bytearray(stream(PIECES[0]))
    data[-6:-2] = b"\x00\x00\x00\x00"
    with pytest.raises(Damaged):
        list(read_frames(io.BytesIO(bytes(data))))


def test_plain_frames_after_announced_ones_are_read_as_a_stream():
    data = stream(PIECES[0]) + CCTX.compress(b"old\nlines") + CCTX.compress(b" more\n")
    assert list(read_frames(io.BytesIO(data))) == [PIECES[0], (None, b"old\nlines more\n")]


def test_duckdb_reads_an_archive_of_announced_frames(tmp_path):
    import duckdb

    path = tmp_path / "billing.f1.jsonl.zst"
    path.write_bytes(stream(("a|billing|h", b'{"app":"billing","n":1}\n{"app":"billing","n":2}\n'),
                            ("b|billing|h", b'{"app":"billing","n":3}\n')))
    assert duckdb.sql(f"select count(*), sum(n) from read_json_auto('{path}')").fetchall() == [(3, 6)]
