"""Slot files, the ledger and the uploader against a real redis-server: crash windows included."""

from __future__ import annotations

import io
import os
import subprocess
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import pytest
import zstandard
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from kafka import TopicPartition

import sluice.slots.appends
from bridge.consumer import Bridge, Reread
from devstack.local import wait_until
from devstack.progress import handed_over
from devstack.serial_upload import upload_sealed
from sluice.archive.store import FileStore, object_key
from sluice.archive.uploader import Uploader
from sluice.core import schema
from sluice.core.errors import LockLost
from sluice.core.schema import BatchState
from sluice.core.settings import Settings
from sluice.formats.records import Record, hour_of
from sluice.formats.spool import Spool
from sluice.handover.batches import Batches
from sluice.handover.kafka_batches import Chunk
from sluice.handover.kafka_probe import fingerprint
from sluice.handover.marks import Marks
from sluice.query.fetch import fetch
from sluice.slots.appends import Appender, Frame
from sluice.slots.sealed import SealedRegistry
from sluice.slots.sealing import Sealer

pytestmark = pytest.mark.integration

APP, HOUR = "billing", "2026010109"
FAR_FUTURE = 4_000_000_000.0


def frame(data: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3).compress(data)


def zstd_cli(path: Path) -> bytes:
    return subprocess.run(["zstd", "-dcq", str(path)], check=True, capture_output=True).stdout


def split_batch(batches: Batches, bid: str, pieces: dict[str, bytes]) -> None:
    """Put a batch in the 'split' state with these pieces pending, as the split task does."""
    batches.r.set(schema.batch_state(bid), BatchState.HANDED.value)
    assert batches.commit_split(bid, pieces)


def open_files(settings: Settings) -> list[Path]:
    return sorted((settings.spool_dir / "open").rglob("*.zst"))


def test_a_piece_is_appended_once_however_often_it_is_delivered(rds, settings):
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    piece = schema.app_hour(APP, HOUR)
    split_batch(batches, "logs:0:0-1", {piece: b"a\nb\n"})
    assert appender.append("logs:0:0-1", APP, HOUR, frame(b"a\nb\n"), 2) is True
    assert appender.append("logs:0:0-1", APP, HOUR, frame(b"a\nb\n"), 2) is False
    [path] = open_files(settings)
    assert zstd_cli(path) == b"a\nb\n"
    # The batch is finished: its keys are gone and it is no longer in flight.
    assert batches.inflight_count() == 0 and not rds.keys(f"{schema.PREFIX}b:*")
    assert int(rds.hget(schema.COUNTERS, schema.Counter.RECORDS_APPENDED.value)) == 2, "counted once"


def test_a_torn_tail_is_cut_before_the_next_append(rds, settings):
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    piece = schema.app_hour(APP, HOUR)
    split_batch(batches, "logs:0:0-0", {piece: b"first\n"})
    split_batch(batches, "logs:0:1-1", {piece: b"second\n"})
    appender.append("logs:0:0-0", APP, HOUR, frame(b"first\n"), 1)
    [path] = open_files(settings)
    with open(path, "ab") as fh:  # a writer killed halfway through its frame
        fh.write(frame(b"torn write that was never committed\n")[:17])
    appender.append("logs:0:1-1", APP, HOUR, frame(b"second\n"), 1)
    assert zstd_cli(path) == b"first\nsecond\n"


def test_a_duplicate_that_loses_the_race_takes_its_bytes_back(rds, settings):
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    piece = schema.app_hour(APP, HOUR)
    split_batch(batches, "logs:0:0-0", {piece: b"once\n"})
    # Another delivery of the same piece holds slot 0, so this one appends in slot 1 ...
    rds.set(schema.slot_lock(schema.slot_id(APP, HOUR, 0)), "someone-else")
    assert appender.append("logs:0:0-0", APP, HOUR, frame(b"once\n"), 1)
    # ... and when that delivery gets to commit in slot 0, the piece is no longer pending.
    rds.delete(schema.slot_lock(schema.slot_id(APP, HOUR, 0)))
    assert not appender.append("logs:0:0-0", APP, HOUR, frame(b"once\n"), 1)
    contents = sorted(zstd_cli(p) if p.stat().st_size else b"" for p in open_files(settings))
    assert contents == [b"", b"once\n"]


def test_a_writer_whose_lease_ran_out_commits_nothing(rds, settings, monkeypatch):
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    piece = schema.app_hour(APP, HOUR)
    split_batch(batches, "logs:0:0-0", {piece: b"late\n"})
    real_pwrite = os.pwrite

    def stalled_pwrite(fd, data, offset):  # the lease expires and another writer takes the slot
        rds.set(schema.slot_lock(schema.slot_id(APP, HOUR, 0)), "new-owner")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr("sluice.slots.appends.os.pwrite", stalled_pwrite)
    with pytest.raises(LockLost):
        appender.append("logs:0:0-0", APP, HOUR, frame(b"late\n"), 1)
    assert batches.pending_pieces("logs:0:0-0") == [piece]
    assert rds.hget(schema.slot_state(schema.slot_id(APP, HOUR, 0)), "size") == b"0"
    assert rds.get(schema.slot_lock(schema.slot_id(APP, HOUR, 0))) == b"new-owner"


def test_concurrent_appenders_use_at_most_n_files_and_lose_nothing(rds, settings, tmp_path):
    settings = settings.replace(**{"slots_per_app": 3})
    batches = Batches(rds, settings)
    written = {f"logs:0:{i}-{i}": f"line {i}\n".encode() for i in range(30)}
    for bid, data in written.items():
        split_batch(batches, bid, {schema.app_hour(APP, HOUR): data})
    barrier = threading.Barrier(len(written))
    errors: list[BaseException] = []

    def work(bid: str, data: bytes) -> None:
        try:
            barrier.wait()
            Appender(rds, settings).append(bid, APP, HOUR, frame(data), 1)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=item) for item in written.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    files = len(open_files(settings))
    assert 1 <= files <= 3
    store = FileStore(tmp_path / "archive")
    assert Sealer(rds, settings).seal_due(now=FAR_FUTURE) == files
    upload_sealed(Uploader(rds, settings, store))
    lines = b"".join(zstd_cli(p) for p in (tmp_path / "archive").rglob("*.zst")).splitlines(keepends=True)
    assert sorted(lines) == sorted(written.values())


def test_seal_and_upload_lay_out_objects_and_empty_the_spool(rds, settings, tmp_path):
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    other_hour = "2026010110"
    split_batch(batches, "logs:0:0-1", {schema.app_hour(APP, HOUR): b"x\n", schema.app_hour(APP, other_hour): b"y\n"})
    appender.append("logs:0:0-1", APP, HOUR, frame(b"x\n"), 1)
    appender.append("logs:0:0-1", APP, other_hour, frame(b"y\n"), 1)
    assert Sealer(rds, settings).seal_due() == 0, "freshly written slots are not idle yet"
    assert Sealer(rds, settings).seal_due(now=FAR_FUTURE) == 2
    store = FileStore(tmp_path / "archive")
    assert upload_sealed(Uploader(rds, settings, store)) == 2
    keys = store.list(f"app={APP}/")
    assert [k.rsplit("/", 1)[0] for k in keys] == [f"app={APP}/dt=2026-01-01/hour=09",
                                                    f"app={APP}/dt=2026-01-01/hour=10"]
    assert [zstd_cli(tmp_path / "archive" / k) for k in keys] == [b"x\n", b"y\n"]
    assert not list(settings.spool_dir.rglob("*.zst"))
    assert rds.hlen(schema.SEALED) == 0 and rds.scard(schema.SLOTS) == 0


def test_a_seal_cut_short_before_its_rename_is_finished_by_the_uploader(rds, settings, tmp_path):
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    split_batch(batches, "logs:0:0-0", {schema.app_hour(APP, HOUR): b"kept\n"})
    appender.append("logs:0:0-0", APP, HOUR, frame(b"kept\n"), 1)
    [open_path] = open_files(settings)
    Sealer(rds, settings).seal_due(now=FAR_FUTURE)
    [sealed] = SealedRegistry(rds).sealed_files()
    # Undo the rename and leave a torn tail, as if the sealer died right after its script.
    sealed_path = Spool(settings.spool_dir).sealed_path(APP, HOUR, sealed.fid)
    open_path.parent.mkdir(parents=True, exist_ok=True)
    sealed_path.replace(open_path)
    with open(open_path, "ab") as fh:
        fh.write(b"\x28\xb5\x2f\xfd garbage")
    store = FileStore(tmp_path / "archive")
    assert upload_sealed(Uploader(rds, settings, store)) == 1
    assert zstd_cli(tmp_path / "archive" / object_key(APP, HOUR, sealed.fid)) == b"kept\n"


class CrashAfterPut(FileStore):
    """A store whose first upload lands but whose caller dies before recording it."""

    crashed = False

    def put(self, local: Path, key: str) -> None:
        super().put(local, key)
        if not self.crashed:
            self.crashed = True
            raise KeyboardInterrupt("worker killed after the upload")


def test_an_upload_repeated_after_a_crash_overwrites_instead_of_duplicating(rds, settings, tmp_path):
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    split_batch(batches, "logs:0:0-0", {schema.app_hour(APP, HOUR): b"one\n"})
    appender.append("logs:0:0-0", APP, HOUR, frame(b"one\n"), 1)
    Sealer(rds, settings).seal_due(now=FAR_FUTURE)
    store = CrashAfterPut(tmp_path / "archive")
    with pytest.raises(KeyboardInterrupt):
        upload_sealed(Uploader(rds, settings, store))
    assert rds.hlen(schema.SEALED) == 1
    upload_sealed(Uploader(rds, settings, store))
    objects = list((tmp_path / "archive").rglob("*.zst"))
    assert len(objects) == 1 and zstd_cli(objects[0]) == b"one\n"
    assert rds.hlen(schema.SEALED) == 0


def records(first: int, last: int) -> list[Record]:
    return [Record(o, 1_795_000_000_000, None, b'{"app":"a","n":%d}' % o, []) for o in range(first, last + 1)]


def chunks(recs: list[Record], per: int = 1) -> list[Chunk]:
    """The records as the bridge's consumer returns them: Kafka record batches of `per`."""
    out = []
    for i in range(0, len(recs), per):
        group = recs[i:i + per]
        builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 1 << 30)
        for r in group:
            builder.append(r.offset - group[0].offset, r.timestamp_ms, r.key, r.value, r.headers)
        data = bytearray(builder.build())
        data[0:8] = group[0].offset.to_bytes(8, "big")
        out.append(Chunk(group[0].offset, group[-1].offset, bytes(data)))
    return out


def test_bridge_replays_are_trimmed_by_the_ledger(rds, settings):
    sent: list[str] = []
    bridge = Bridge(settings, rds, send_split=sent.append)
    tp = TopicPartition("logs", 3)
    bridge.hand_over(tp, chunks(records(0, 99), per=10))
    bridge.hand_over(tp, chunks(records(50, 149), per=10))  # redelivered after a crash before the commit
    bridge.hand_over(tp, chunks(records(0, 149), per=10))
    assert sent == ["logs:3:0-99", "logs:3:100-149"]
    assert Marks(rds).high_water_mark("logs", 3) == 149


def test_bridge_batches_within_count_and_byte_limits(rds, settings):
    settings = settings.replace(**{"batch_max_records": 20, "batch_max_bytes": 10_000})
    sent: list[str] = []
    bridge = Bridge(settings, rds, send_split=sent.append)
    bridge.hand_over(TopicPartition("logs", 0), chunks(records(0, 44)))
    assert sent == ["logs:0:0-19", "logs:0:20-39", "logs:0:40-44"]
    big = [Record(100 + i, 0, None, b"x" * 4000, []) for i in range(5)]
    bridge.hand_over(TopicPartition("logs", 0), chunks(big))
    assert sent[3:] == ["logs:0:100-101", "logs:0:102-103", "logs:0:104-104"]


def test_a_batch_is_split_once(rds, settings):
    batches = Batches(rds, settings)
    split_batch(batches, "logs:0:0-9", {"a|2026112409": b"1\n"})
    assert not batches.commit_split("logs:0:0-9", {"a|2026112409": b"1\n", "b|2026112409": b"2\n"})
    assert batches.pending_pieces("logs:0:0-9") == ["a|2026112409"]


def test_a_bundle_of_pieces_is_appended_once(rds, settings):
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    data = {("web", HOUR): b"w\n", ("db", HOUR): b"d1\nd2\n", ("web", "2026010110"): b"w2\n"}
    split_batch(batches, "logs:1:0-3", {schema.app_hour(a, h): d for (a, h), d in data.items()})
    frames = [Frame(a, h, frame(d), d.count(b"\n")) for (a, h), d in data.items()]
    assert appender.append_many("logs:1:0-3", frames) == 3
    assert appender.append_many("logs:1:0-3", frames) == 0
    contents = sorted(zstd_cli(p) for p in open_files(settings))
    assert contents == sorted(data.values())
    assert batches.inflight_count() == 0 and not rds.keys(f"{schema.PREFIX}b:*")
    assert not rds.keys(schema.SLOT_LOCK_PREFIX + "*"), "every lock is released"


def test_a_slot_past_the_seal_size_is_sealed_by_its_append(rds, settings):
    settings = settings.replace(**{"seal_size_bytes": 64})
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    small, big = b"s\n", b"".join(b"line %d\n" % i for i in range(200))
    split_batch(batches, "logs:0:0-0", {schema.app_hour(APP, HOUR): small})
    split_batch(batches, "logs:0:1-1", {schema.app_hour(APP, HOUR): big})
    appender.append("logs:0:0-0", APP, HOUR, frame(small), 1)
    assert not SealedRegistry(rds).sealed_files()
    appender.append("logs:0:1-1", APP, HOUR, frame(big), 200)
    [sealed] = SealedRegistry(rds).sealed_files()
    assert zstd_cli(Spool(settings.spool_dir).sealed_path(APP, HOUR, sealed.fid)) == small + big
    assert not open_files(settings) and rds.scard(schema.SLOTS) == 0


def test_a_running_hour_is_sealed_only_after_the_longer_open_hour_age(rds, settings):
    settings = settings.replace(**{"seal_age_seconds": 1, "seal_open_hour_age_seconds": 100})
    batches, appender = Batches(rds, settings), Appender(rds, settings)
    running = hour_of(time.time() + 7200)  # an hour that is not over yet
    split_batch(batches, "logs:0:0-0", {schema.app_hour(APP, running): b"now\n", schema.app_hour(APP, HOUR): b"old\n"})
    appender.append("logs:0:0-0", APP, running, frame(b"now\n"), 1)
    appender.append("logs:0:0-0", APP, HOUR, frame(b"old\n"), 1)
    assert Sealer(rds, settings).seal_due(now=time.time() + 5) == 1  # the past hour only
    assert [s.hour for s in SealedRegistry(rds).sealed_files()] == [HOUR]
    assert Sealer(rds, settings).seal_due(now=time.time() + 150) == 1
    assert sorted(s.hour for s in SealedRegistry(rds).sealed_files()) == sorted([HOUR, running])


class Freezer:
    """Freezes one writer at a chosen step, as SIGSTOP would freeze a worker, until thawed."""

    def __init__(self) -> None:
        self.victim: threading.Thread | None = None
        self.frozen, self.thaw = threading.Event(), threading.Event()
        self.errors: list[BaseException] = []

    def maybe_freeze(self) -> None:
        if threading.current_thread() is self.victim:
            self.frozen.set()
            assert self.thaw.wait(30)

    def freeze_stale_writer(self, rds, settings: Settings) -> None:
        """Start a writer of batch 1-1 ("stale"), wait until it is frozen and its lease lapsed."""
        def stale_writer() -> None:
            try:
                Appender(rds, settings).append("logs:0:1-1", APP, HOUR, frame(b"stale\n"), 1)
            except BaseException as exc:  # noqa: BLE001 - inspected by the test
                self.errors.append(exc)

        self.victim = threading.Thread(target=stale_writer)
        self.victim.start()
        assert self.frozen.wait(10)
        wait_until(lambda: rds.get(schema.slot_lock(schema.slot_id(APP, HOUR, 0))) is None, 5, "the lease to lapse")

    def resume(self) -> list[BaseException]:
        self.thaw.set()
        self.victim.join(10)
        return self.errors


def three_batches_one_appended(rds, settings: Settings) -> tuple[Settings, Batches, str]:
    """Lease 1 s, so a frozen writer's slot is handed on while it sleeps; batches 0-0 ("first",
    appended), 1-1 ("stale") and 2-2 ("second") of one app-hour."""
    settings = settings.replace(**{"compress_time_limit": 0.5, "lock_lease_seconds": 1.0})
    batches = Batches(rds, settings)
    piece = schema.app_hour(APP, HOUR)
    split_batch(batches, "logs:0:0-0", {piece: b"first\n"})
    split_batch(batches, "logs:0:1-1", {piece: b"stale\n"})
    split_batch(batches, "logs:0:2-2", {piece: b"second\n"})
    Appender(rds, settings).append("logs:0:0-0", APP, HOUR, frame(b"first\n"), 1)
    return settings, batches, piece


def test_a_writer_frozen_before_its_file_lock_leaves_later_commits_alone(rds, settings, monkeypatch):
    settings, batches, piece = three_batches_one_appended(rds, settings)
    freezer = Freezer()
    real_locked_file = sluice.slots.appends.locked_file

    def freezing_locked_file(path, create=False):
        freezer.maybe_freeze()  # frozen after taking the Redis lock, before the file lock
        return real_locked_file(path, create)

    monkeypatch.setattr("sluice.slots.appends.locked_file", freezing_locked_file)
    freezer.freeze_stale_writer(rds, settings)
    # Another writer takes the same slot and commits after "first".
    assert Appender(rds, settings).append("logs:0:2-2", APP, HOUR, frame(b"second\n"), 1)
    errors = freezer.resume()
    assert errors and isinstance(errors[0], LockLost)
    [path] = open_files(settings)
    assert zstd_cli(path) == b"first\nsecond\n"
    assert int(rds.hget(schema.slot_state(schema.slot_id(APP, HOUR, 0)), "size")) == path.stat().st_size
    assert batches.pending_pieces("logs:0:1-1") == [piece], "the stale piece is still to do"
    Appender(rds, settings).append("logs:0:1-1", APP, HOUR, frame(b"stale\n"), 1)
    assert zstd_cli(path) == b"first\nsecond\nstale\n"


def test_a_writer_frozen_holding_its_file_lock_is_passed_over(rds, settings, monkeypatch):
    settings, _, _ = three_batches_one_appended(rds, settings)
    freezer = Freezer()
    real_write_at = sluice.slots.appends.write_at

    def freezing_write_at(fd, data, at):
        end = real_write_at(fd, data, at)
        freezer.maybe_freeze()  # frozen after writing, holding the file lock, before the commit
        return end

    monkeypatch.setattr("sluice.slots.appends.write_at", freezing_write_at)
    freezer.freeze_stale_writer(rds, settings)
    appender = Appender(rds, settings)
    assert appender.append("logs:0:2-2", APP, HOUR, frame(b"second\n"), 1)  # goes to slot 1
    assert Sealer(rds, settings).seal_due(now=FAR_FUTURE) == 1, "the frozen writer's file cannot be sealed"
    errors = freezer.resume()
    assert errors and isinstance(errors[0], LockLost)
    [path] = open_files(settings)
    assert zstd_cli(path) == b"first\n", "the frozen writer took its own bytes back"
    assert rds.hget(schema.slot_state(schema.slot_id(APP, HOUR, 1)), "fid") is None, "slot 1 was sealed"
    [sealed] = SealedRegistry(rds).sealed_files()
    assert zstd_cli(Spool(settings.spool_dir).sealed_path(APP, HOUR, sealed.fid)) == b"second\n"


def test_a_recreated_topic_is_archived_again_and_a_replay_is_not(rds, settings, caplog):
    sent: list[str] = []
    probed: list[int] = []
    log_now: dict[int, Record] = {}  # what the broker holds now, by offset

    def probe(tp, offset):
        probed.append(offset)
        found = sorted(o for o in log_now if o >= offset)
        return (found[0], fingerprint(log_now[found[0]])) if found else None

    bridge = Bridge(settings, rds, send_split=sent.append, probe=probe)
    tp = TopicPartition("logs", 3)
    old = records(0, 99)
    log_now.update((r.offset, r) for r in old)
    bridge.hand_over(tp, chunks(old))
    bridge.hand_over(tp, chunks(old[10:40]))  # a replay that does not reach the mark: the broker is asked
    assert probed == [99] and sent == ["logs:3:0-99"]
    # The topic is deleted and recreated: offsets start at 0 again, with other records.
    new = [r._replace(value=b'{"app":"a","new":%d}' % r.offset) for r in records(0, 49)]
    log_now = {r.offset: r for r in new}
    with caplog.at_level("WARNING", logger="sluice.bridge"), pytest.raises(Reread):
        bridge.hand_over(tp, chunks(new[20:]), verify=True)  # records past a quiet spell are checked
    assert sent == ["logs:3:0-99"], "nothing of the new incarnation is handed over from its middle"
    bridge.hand_over(tp, chunks(new))  # read again from its beginning
    assert sent == ["logs:3:0-99", "logs:3:0-49@1"]
    assert "recreated" in caplog.text and "incarnation 1" in caplog.text
    assert handed_over(rds) == 150
    bridge.hand_over(tp, chunks(new))  # a replay within the new incarnation is trimmed as before
    assert sent == ["logs:3:0-99", "logs:3:0-49@1"]


def archive_wave(rds, settings: Settings, store: FileStore, n: int, data: bytes) -> None:
    """One wave of late records for APP/HOUR: split, appended, sealed, uploaded."""
    split_batch(Batches(rds, settings), f"logs:0:{n}-{n}", {schema.app_hour(APP, HOUR): data})
    Appender(rds, settings).append(f"logs:0:{n}-{n}", APP, HOUR, frame(data), data.count(b"\n"))
    assert Sealer(rds, settings).seal_due(now=FAR_FUTURE) == 1
    upload_sealed(Uploader(rds, settings, store))


def test_late_waves_are_merged_so_an_app_hour_keeps_at_most_n_objects(rds, settings, tmp_path):
    settings = settings.replace(**{"slots_per_app": 2})
    store = FileStore(tmp_path / "archive")
    expected = b""
    for n in range(6):
        data = b"".join(b"wave %d line %d\n" % (n, i) for i in range(n + 1))
        archive_wave(rds, settings, store, n, data)
        expected += data
        objects = list((tmp_path / "archive").rglob("*.zst"))
        assert len(objects) == min(n + 1, 2), objects
    assert sorted(b"".join(zstd_cli(p) for p in objects).splitlines()) == sorted(expected.splitlines())
    assert any(".g" in p.name for p in objects), "later waves were merged into a next generation"
    out = io.BytesIO()
    fetch(store, APP, datetime(2026, 1, 1, 9, tzinfo=timezone.utc), datetime(2026, 1, 1, 10, tzinfo=timezone.utc),
          out, timestamp_field="")
    assert sorted(out.getvalue().splitlines()) == sorted(expected.splitlines())
    assert rds.hlen(schema.SEALED) == 0 and not rds.hlen(schema.UPLOAD_PLAN)


class CrashAfterMerge(FileStore):
    """A store whose merged object lands, and whose caller dies before deleting the old one."""

    crashed = False

    def put(self, local: Path, key: str) -> None:
        super().put(local, key)
        if ".g" in key and not self.crashed:
            self.crashed = True
            raise KeyboardInterrupt("worker killed after writing the merge")


def test_a_merge_cut_short_is_finished_once_and_readers_see_each_record_once(rds, settings, tmp_path):
    settings = settings.replace(**{"slots_per_app": 1})
    store = CrashAfterMerge(tmp_path / "archive")
    archive_wave(rds, settings, store, 0, b"first\n")
    with pytest.raises(KeyboardInterrupt):
        archive_wave(rds, settings, store, 1, b"late\n")
    assert len(list((tmp_path / "archive").rglob("*.zst"))) == 2, "old and new generation side by side"
    window = (datetime(2026, 1, 1, 9, tzinfo=timezone.utc), datetime(2026, 1, 1, 10, tzinfo=timezone.utc))
    out = io.BytesIO()
    fetch(store, APP, *window, out, timestamp_field="")
    assert sorted(out.getvalue().splitlines()) == [b"first", b"late"], "no record twice in the window"
    upload_sealed(Uploader(rds, settings, store))  # the next sweep finishes the same plan
    [merged] = list((tmp_path / "archive").rglob("*.zst"))
    assert zstd_cli(merged) == b"first\nlate\n"
    assert rds.hlen(schema.SEALED) == 0


def test_the_scripts_name_keys_as_the_schema_builds_them(rds, settings):
    """The append, commit and seal scripts build slot and sealed-file names themselves."""
    settings = settings.replace(**{"seal_size_bytes": 64})
    batches = Batches(rds, settings)
    split_batch(batches, "logs:0:0-0", {schema.app_hour(APP, HOUR): b"a\n"})
    big = os.urandom(200).hex().encode() + b"\n"  # incompressible: past the seal size
    split_batch(batches, "logs:0:1-1", {schema.app_hour(APP, HOUR): big})
    sid = schema.slot_id(APP, HOUR, 0)
    Appender(rds, settings).append("logs:0:0-0", APP, HOUR, frame(b"a\n"), 1)
    assert rds.smembers(schema.SLOTS) == {sid.encode()}
    fid = rds.hget(schema.slot_state(sid), "fid").decode()
    assert int(rds.hget(schema.COUNTERS, schema.Counter.RECORDS_APPENDED.value)) == 1
    Appender(rds, settings).append("logs:0:1-1", APP, HOUR, frame(big), 1)  # sealed by size
    assert list(rds.hkeys(schema.SEALED)) == [schema.sealed_entry(APP, HOUR, fid).encode()]
    assert not rds.exists(schema.slot_state(sid), schema.slot_lock(sid))
    assert all(schema.is_schema_key(k.decode()) for k in rds.keys(schema.PREFIX + "*"))
