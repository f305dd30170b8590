"""The time index (sluice.formats.frames): an uploaded object ends with an index of its frames, and a fetch
of a narrow window reads only the frames that overlap it; a damaged index is never trusted."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import orjson
import pytest
import zstandard

from devstack.serial_upload import upload_sealed
from sluice.archive.store import FileStore
from sluice.archive.uploader import Uploader
from sluice.core import schema
from sluice.core.schema import BatchState
from sluice.formats.frames import parse_index
from sluice.formats.records import hour_start
from sluice.handover.batches import Batches
from sluice.query.fetch import Fetch, Query
from sluice.query.listing import list_hours
from sluice.query.where import parse_where
from sluice.slots.appends import Appender
from sluice.slots.compress import compress_pieces
from sluice.slots.sealing import Sealer
from tests.integration.test_slots import FAR_FUTURE

pytestmark = pytest.mark.integration

APP, HOUR = "billing", "2026010109"
START = hour_start(HOUR)
CCTX = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)


def archive(rds, settings, tmp_path: Path) -> tuple[FileStore, Path, list[list[bytes]]]:
    """Six batches of one app-hour, each ten minutes of it, archived as one object."""
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    slices = []
    for n in range(6):
        lines = [orjson.dumps({"app": APP, "ts": START + n * 600 + i * 6, "n": n, "i": i}) for i in range(100)]
        bid, piece = f"logs:0:{n * 100}-{n * 100 + 99}", schema.app_hour(APP, HOUR)
        rds.set(schema.batch_state(bid), BatchState.HANDED.value)
        span = (int((START + n * 600) * 1000), int((START + n * 600 + 594) * 1000))
        assert batches.commit_split(bid, {piece: b"\n".join(lines) + b"\n"}, {piece: 100}, None, {piece: span})
        assert compress_pieces(batches, appender, CCTX, bid, [piece]) == 1
        slices.append(lines)
    Sealer(rds, settings).seal_due(now=FAR_FUTURE)
    store = FileStore(tmp_path / "archive")
    assert upload_sealed(Uploader(rds, settings, store)) == 1
    [path] = (tmp_path / "archive").rglob("*.zst")
    return store, path, slices


def fetch(store: FileStore, since: float, until: float) -> tuple[list[bytes], Fetch, list[str]]:
    out, warnings = io.BytesIO(), []
    job = Fetch(store, Query(APP, datetime.fromtimestamp(since, timezone.utc),
                             datetime.fromtimestamp(until, timezone.utc)), out, warn=warnings.append)
    job.run()
    return out.getvalue().split(b"\n")[:-1], job, warnings


def test_an_object_ends_with_an_index_and_a_window_reads_only_its_frames(rds, settings, tmp_path):
    store, path, slices = archive(rds, settings, tmp_path)
    data = path.read_bytes()
    entries = parse_index(data[-4096:], len(data))
    assert [e.meta.records for e in entries] == [100] * 6
    lines, job, warnings = fetch(store, START + 1200, START + 1800)  # the third batch's ten minutes
    assert lines == slices[2] and not warnings and not job.damaged
    assert (job.stats.frames_listed, job.stats.frames_skipped, job.stats.frames_read) == (6, 5, 1)
    assert job.stats.compressed_bytes < len(data) / 4, "one frame's bytes read, not the object's"
    assert job.stats.lines_scanned == 0, "a frame wholly inside the window is printed without parsing"
    lines, job, _ = fetch(store, START, START + 3600)
    assert lines == [line for part in slices for line in part], "the whole hour, in order"


def test_a_window_across_frames_prints_exactly_its_lines(rds, settings, tmp_path):
    store, _, slices = archive(rds, settings, tmp_path)
    lines, job, _ = fetch(store, START + 900, START + 1500)
    expected = [line for part in slices for line in part if START + 900 <= orjson.loads(line)["ts"] < START + 1500]
    assert lines == expected and job.stats.frames_read == 2


@pytest.mark.parametrize("at", [-1, -5, -20, -60], ids=["signature", "crc", "entry", "offsets"])
def test_a_damaged_index_is_said_and_every_frame_read(rds, settings, tmp_path, at):
    store, path, slices = archive(rds, settings, tmp_path)
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))
    lines, job, warnings = fetch(store, START + 1200, START + 1800)
    assert lines == slices[2], "every record of the window, from walking the frames"
    assert not job.damaged, "nothing was lost"
    if at != -1:  # without its signature the object just has no index, as one written before indexes
        assert len(warnings) == 1 and path.name in warnings[0] and "index" in warnings[0]


def test_a_frame_that_disagrees_with_the_index_is_not_skipped(rds, settings, tmp_path):
    store, path, slices = archive(rds, settings, tmp_path)
    data = path.read_bytes()
    entries = parse_index(data[-4096:], len(data))
    # The third frame's announcement claims other times than the index (as if the table were
    # of another object): the index is not trusted, and nothing is skipped on its word.
    third = entries[2].offset
    forged = bytearray(data)
    forged[third + 8 + 12] ^= 0x01  # the announced earliest time
    path.write_bytes(bytes(forged))
    lines, job, warnings = fetch(store, START + 1200, START + 1800)
    assert lines == slices[2] and not job.damaged
    assert warnings and "index" in warnings[0]


def test_a_corrupt_frame_in_the_window_is_named_and_fetch_exits_damaged(rds, settings, tmp_path):
    store, path, slices = archive(rds, settings, tmp_path)
    data = path.read_bytes()
    entries = parse_index(data[-4096:], len(data))
    third = entries[2]
    forged = bytearray(data)
    forged[third.offset + third.length - 6] ^= 0xFF  # inside the zstd frame
    path.write_bytes(bytes(forged))
    lines, job, warnings = fetch(store, START, START + 3600)
    assert job.damaged and any(path.name in w for w in warnings)
    assert lines[:200] == slices[0] + slices[1], "everything before the damage is printed"


def test_an_object_uploaded_before_indexes_is_still_read(rds, settings, tmp_path):
    store, path, slices = archive(rds, settings, tmp_path)
    data = path.read_bytes()
    entries = parse_index(data[-4096:], len(data))
    end = entries[-1].offset + entries[-1].length
    path.write_bytes(data[:end])  # as the uploader wrote objects before this version
    lines, job, warnings = fetch(store, START + 1200, START + 1800)
    assert lines == slices[2] and not warnings and not job.damaged
    assert job.stats.frames_skipped == 5, "announcements alone let it skip the other frames' decompression"


def test_where_keeps_matching_records_and_parses_only_lines_that_can_match(rds, settings, tmp_path):
    store, _, slices = archive(rds, settings, tmp_path)
    out = io.BytesIO()
    job = Fetch(store, Query(APP, datetime.fromtimestamp(START, timezone.utc),
                             datetime.fromtimestamp(START + 3600, timezone.utc),
                             where=(parse_where("n=3"), parse_where("i~^[0-4]$"))), out)
    job.run()
    assert out.getvalue().split(b"\n")[:-1] == [line for line in slices[3] if orjson.loads(line)["i"] < 5]
    # The literal "3" is in many lines' times and numbers, but far from all: not every line is parsed.
    assert 0 < job.stats.lines_scanned < 600


def test_count_of_whole_hours_comes_from_the_index(rds, settings, tmp_path):
    store, _, _ = archive(rds, settings, tmp_path)
    out = io.BytesIO()
    job = Fetch(store, Query(APP, datetime.fromtimestamp(START, timezone.utc),
                             datetime.fromtimestamp(START + 3600, timezone.utc), count_only=True), out)
    assert job.run() == 600
    assert job.stats.frames_read == 0 and job.stats.decompressed_bytes == 0, "nothing decompressed"


def test_ls_lists_an_apps_hours_from_the_indexes_and_the_apps_present(rds, settings, tmp_path):
    store, path, _ = archive(rds, settings, tmp_path)
    since = datetime.fromtimestamp(START - 7200, timezone.utc)
    [row] = list_hours(store, APP, since, datetime.fromtimestamp(START + 7200, timezone.utc))
    assert (row.hour, row.objects, row.records, row.compressed_bytes) == (HOUR, 1, 600, path.stat().st_size)
    assert store.apps() == [APP]
    env = {**os.environ, "SLUICE_STORE_URL": f"file://{tmp_path / 'archive'}", "SLUICE_METRICS_PORT": "0"}
    listed = subprocess.run([sys.executable, "-m", "sluice.cli", "ls"], env=env, capture_output=True, text=True,
                            check=True)
    assert listed.stdout.split() == [APP]
    hours = subprocess.run([sys.executable, "-m", "sluice.cli", "ls", "--app", APP, "--since", "2026-01-01T00:00Z",
                            "--until", "2026-01-02T00:00Z"], env=env, capture_output=True, text=True, check=True)
    assert "2026-01-01 09h" in hours.stdout and "600" in hours.stdout


def test_a_late_data_merge_keeps_a_correct_index(rds, settings, tmp_path):
    one = settings.replace(**{"slots_per_app": 1})
    store, path, slices = archive(rds, one, tmp_path)  # the app-hour has its one object
    batches, appender = Batches(rds, one), Appender(rds, one)
    late = [orjson.dumps({"app": APP, "ts": START + 3000 + i, "n": 9, "i": i}) for i in range(50)]
    bid, piece = "logs:1:0-49", schema.app_hour(APP, HOUR)
    rds.set(schema.batch_state(bid), BatchState.HANDED.value)
    span = (int((START + 3000) * 1000), int((START + 3049) * 1000))
    assert batches.commit_split(bid, {piece: b"\n".join(late) + b"\n"}, {piece: 50}, None, {piece: span})
    assert compress_pieces(batches, appender, CCTX, bid, [piece]) == 1
    Sealer(rds, one).seal_due(now=FAR_FUTURE)
    assert upload_sealed(Uploader(rds, one, store)) == 1
    [merged] = (tmp_path / "archive").rglob("*.zst")
    assert merged.name.endswith(".g1.jsonl.zst")
    data = merged.read_bytes()
    entries = parse_index(data[-4096:], len(data))
    assert [e.meta.records for e in entries] == [100] * 6 + [50], "the old frames and the late one"
    lines, job, _ = fetch(store, START + 3000, START + 3060)
    earlier = [line for line in slices[5] if orjson.loads(line)["ts"] < START + 3060]
    assert lines == earlier + late and job.stats.frames_read == 2
