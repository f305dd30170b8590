"""The long tail (sluice.archive.tail): small pieces of many apps share tail files, archived as one object
per app and hour, exactly once whatever step a crash cuts short."""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import pytest
import redis
import zstandard

from devstack.serial_upload import upload_sealed
from sluice.archive.store import FileStore
from sluice.archive.tail import TailArchiver
from sluice.archive.uploader import Uploader
from sluice.core import schema
from sluice.core.errors import Damaged
from sluice.core.schema import BatchState
from sluice.formats.records import hour_start
from sluice.formats.spool import SealedFile
from sluice.handover.batches import Batches
from sluice.handover.split import pieces_of
from sluice.query.fetch import Fetch, Query, SpoolReader
from sluice.slots.appends import Appender
from sluice.slots.compress import compress_pieces
from sluice.slots.sealing import Sealer
from tests.integration.test_live_fetch import window
from tests.integration.test_slots import FAR_FUTURE, zstd_cli

pytestmark = pytest.mark.integration

HOUR = "2026010109"
APPS = ["alpha", "beta", "gamma", "_quarantine"]
CCTX = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)


class Tail:
    """Batches whose pieces are all small, compressed as the compress task does: into tail files."""

    def __init__(self, rds: redis.Redis, settings) -> None:
        self.rds, self.settings = rds, settings
        self.batches, self.appender = Batches(rds, settings), Appender(rds, settings)
        self.lines: dict[str, list[bytes]] = {app: [] for app in APPS}
        self.n = 0

    def batch(self, apps: list[str] = APPS) -> None:
        bid = f"logs:0:{self.n}-{self.n + len(apps) - 1}"
        pieces = {}
        for app in apps:
            line = b'{"app":"%s","n":%d}' % (app.encode(), self.n)
            self.n += 1
            self.lines[app].append(line)
            pieces[schema.app_hour(app, HOUR)] = [line]
        start = hour_start(HOUR)
        packed = pieces_of({schema.parse_app_hour(piece): lines for piece, lines in pieces.items()},
                           {schema.parse_app_hour(piece): (start, start + 0.01) for piece in pieces},
                           tail_piece_bytes=1024)
        self.rds.set(schema.batch_state(bid), BatchState.HANDED.value)  # as the split finds it
        assert self.batches.commit_split(bid, {name: p.data for name, p in packed.items()},
                                         {name: p.records for name, p in packed.items()}, None,
                                         {name: p.span for name, p in packed.items()})
        assert list(packed) == [schema.app_hour(schema.TAIL_APP, HOUR)], "one tail piece"
        assert compress_pieces(self.batches, self.appender, CCTX, bid, list(packed)) == 1

    def sealed(self) -> list[SealedFile]:
        Sealer(self.rds, self.settings).seal_due(now=FAR_FUTURE)
        return [f for f in Uploader(self.rds, self.settings, None).registry.sealed_files()  # type: ignore[arg-type]
                if f.app == schema.TAIL_APP]


def archived(root: Path) -> dict[str, list[bytes]]:
    """Each app's lines in the store, object by object in key order."""
    out: dict[str, list[bytes]] = {}
    for path in sorted(root.rglob("*.jsonl.zst")):
        app = path.name.split(".")[0]
        out.setdefault(app, []).extend(zstd_cli(path).split(b"\n")[:-1])
    return out


def assert_archived_once(tail: Tail, root: Path) -> None:
    """Every line once; objects of several archives of the hour come in no particular order."""
    assert {app: sorted(lines) for app, lines in archived(root).items()} == \
        {app: sorted(lines) for app, lines in tail.lines.items()}
    assert not tail.rds.hlen(schema.SEALED) and not tail.rds.hlen(schema.TAIL_PLAN)
    assert not list(tail.settings.spool_dir.rglob("*.zst")), "the tail files are gone"


def test_small_pieces_of_many_apps_share_a_tail_file_and_end_as_one_object_per_app(rds, settings, tmp_path):
    tail = Tail(rds, settings)
    for _ in range(5):
        tail.batch()
    tail.batch(["beta"])
    [sealed] = tail.sealed()
    assert rds.hget(schema.SEALED_RECORDS, sealed.entry) == b"21"
    store = FileStore(tmp_path / "archive")
    assert upload_sealed(Uploader(rds, settings, store)) == len(APPS)
    objects = list((tmp_path / "archive").rglob("*.jsonl.zst"))
    assert Counter(p.parent for p in objects) == Counter({p.parent: 1 for p in objects}), "one object per app-hour"
    assert archived(tmp_path / "archive") == tail.lines, "in the order they came"
    assert_archived_once(tail, tmp_path / "archive")
    counts = {k.decode(): int(v) for k, v in rds.hgetall(schema.ARCHIVED_RECORDS).items()}
    assert counts == {app: len(lines) for app, lines in tail.lines.items()}
    assert int(rds.hget(schema.COUNTERS, "uploads_ok")) == len(APPS)


class Crash(BaseException):
    """A worker killed at this step."""


class CrashingStore(FileStore):
    """Stores the first `land` objects of a batch of them, then dies."""

    def __init__(self, root: Path, land: int) -> None:
        super().__init__(root)
        self.land, self.crashed = land, False

    def put_objects(self, objects: list[tuple[str, bytes]]) -> None:
        if self.crashed:
            return super().put_objects(objects)
        self.crashed = True
        super().put_objects(objects[:self.land])
        raise Crash


@pytest.mark.parametrize("land", [0, 2, len(APPS)])
def test_a_crash_while_storing_the_objects_loses_and_doubles_nothing(rds, settings, tmp_path, land):
    tail = Tail(rds, settings)
    for _ in range(3):
        tail.batch()
    files = tail.sealed()
    store = CrashingStore(tmp_path / "archive", land)
    archiver = TailArchiver(rds, settings, store)
    with pytest.raises(Crash):
        archiver.archive_hour(HOUR, files)
    assert rds.hget(schema.TAIL_PLAN, HOUR), "the plan outlives the crash"
    tail.batch()  # more small pieces, in a tail file the crashed archive did not plan
    more = tail.sealed()
    assert archiver.archive_hour(HOUR, more) == len(APPS), "the planned set first"
    assert archiver.archive_hour(HOUR, tail.sealed()) == len(APPS), "then the new file"
    assert_archived_once(tail, tmp_path / "archive")
    assert_one_object_per_app(tmp_path / "archive")


def assert_one_object_per_app(root: Path) -> None:
    objects = Counter(p.parent for p in root.rglob("*.jsonl.zst"))
    assert len(objects) == len(APPS) and set(objects.values()) == {1}, objects


@pytest.mark.parametrize("land", [0, 2, len(APPS)])
def test_late_tail_files_join_each_apps_object_and_a_crash_while_merging_doubles_nothing(rds, settings, tmp_path,
                                                                                        land):
    tail = Tail(rds, settings)
    tail.batch()
    store = FileStore(tmp_path / "archive")
    assert TailArchiver(rds, settings, store).archive_hour(HOUR, tail.sealed()) == len(APPS)
    tail.batch()  # late records of the same hour
    files = tail.sealed()
    with pytest.raises(Crash):
        TailArchiver(rds, settings, CrashingStore(tmp_path / "archive", land)).archive_hour(HOUR, files)
    assert TailArchiver(rds, settings, store).archive_hour(HOUR, files) == len(APPS) - land
    assert_archived_once(tail, tmp_path / "archive")
    assert_one_object_per_app(tmp_path / "archive")
    assert archived(tmp_path / "archive") == tail.lines, "the late lines after the earlier ones"
    names = [p.name for p in (tmp_path / "archive").rglob("*.zst")]
    assert all(name.endswith(".g1.jsonl.zst") for name in names), "each the next generation of its object"


def test_a_crash_after_deleting_a_tail_file_finishes_without_writing_again(rds, settings, tmp_path, monkeypatch):
    tail = Tail(rds, settings)
    tail.batch()
    # Two tail files of one hour: a second compress held the first slot's lease meanwhile.
    token = Appender(rds, settings).leases.try_lock(schema.slot_id(schema.TAIL_APP, HOUR, 0))
    tail.batch()
    Appender(rds, settings).leases.unlock([schema.slot_id(schema.TAIL_APP, HOUR, 0)], token)
    files = tail.sealed()
    assert len(files) == 2
    store = FileStore(tmp_path / "archive")
    unlink = Path.unlink
    calls = []

    def dies_after_the_first(path: Path, missing_ok: bool = False) -> None:
        unlink(path, missing_ok=missing_ok)
        calls.append(path)
        if len(calls) == 1:
            raise Crash

    monkeypatch.setattr(Path, "unlink", dies_after_the_first)
    with pytest.raises(Crash):
        TailArchiver(rds, settings, store).archive_hour(HOUR, files)
    monkeypatch.setattr(Path, "unlink", unlink)
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "archive").rglob("*.zst")}
    assert TailArchiver(rds, settings, store).archive_hour(HOUR, files) == 0, "nothing written again"
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "archive").rglob("*.zst")} == before
    assert_archived_once(tail, tmp_path / "archive")


def test_a_fetch_prints_what_it_read_from_a_tail_file_once_after_the_file_is_archived(rds, settings, tmp_path):
    tail = Tail(rds, settings)
    for _ in range(3):
        tail.batch()
    store = FileStore(tmp_path / "archive")
    out = io.BytesIO()
    job = Fetch(store, Query("beta", *window(HOUR)), out, SpoolReader(rds, settings.spool_dir, settings.slots_per_app))
    job.run()  # the three lines from the open tail file
    assert out.getvalue().split(b"\n")[:-1] == tail.lines["beta"]
    tail.batch()  # one more, then the tail file is sealed and archived
    upload_sealed(Uploader(rds, settings, store))
    job.run()  # the same fetch job, as --follow reads again: the object holds all four
    assert out.getvalue().split(b"\n")[:-1] == tail.lines["beta"], "each line once, in order"


def test_a_damaged_tail_file_is_kept_and_fails_its_upload_loudly(rds, settings, tmp_path):
    tail = Tail(rds, settings)
    tail.batch()
    [sealed] = tail.sealed()
    path = settings.spool_dir / "sealed" / schema.TAIL_APP / HOUR / f"{sealed.fid}.jsonl.zst"
    data = bytearray(path.read_bytes())
    data[-6] ^= 0xFF  # a bit flip in the frame
    path.write_bytes(bytes(data))
    with pytest.raises(Damaged, match=r"^corrupt frame: "):  # sluice.formats.frames, on zstd's error
        TailArchiver(rds, settings, FileStore(tmp_path / "archive")).archive_hour(HOUR, [sealed])
    assert path.exists() and rds.hexists(schema.SEALED, sealed.entry), "nothing dropped"
    assert not list((tmp_path / "archive").rglob("*.zst"))


def test_a_tail_piece_is_appended_once_however_often_it_is_delivered(rds, settings):
    tail = Tail(rds, settings)
    tail.batch()
    bid, piece = "logs:0:0-3", schema.app_hour(schema.TAIL_APP, HOUR)
    assert compress_pieces(tail.batches, tail.appender, CCTX, bid, [piece]) == 0, "a redelivery"
    [sealed] = tail.sealed()
    assert rds.hget(schema.SEALED_RECORDS, sealed.entry) == str(len(APPS)).encode()
    assert int(rds.hget(schema.COUNTERS, schema.Counter.RECORDS_APPENDED.value)) == len(APPS), "counted once"
    [hourly] = rds.keys(schema.hourly_records("*"))
    assert rds.hgetall(hourly) == {schema.TAIL_APP.encode(): str(len(APPS)).encode()}, \
        "the tail's apps counted together in the hour's table"
