"""`sluice fetch` reads the spool too: open and sealed files up to their committed size, merged
with the store, each record once whatever a seal or an upload does meanwhile."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
import redis
import zstandard
from kafka import KafkaProducer

from devstack.local import wait_until
from devstack.serial_upload import upload_sealed
from sluice.archive.store import FileStore
from sluice.archive.uploader import Uploader
from sluice.core import schema
from sluice.handover.batches import Batches
from sluice.query.fetch import Fetch, Query, SpoolReader
from sluice.slots.appends import Appender
from sluice.slots.compress import compress_pieces
from sluice.slots.sealing import Sealer
from tests.integration.test_slots import FAR_FUTURE, open_files, split_batch

pytestmark = pytest.mark.integration

APP = "billing"
CCTX = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)


class Spooled:
    """Batches of one app-hour appended as the compress task appends them."""

    def __init__(self, rds: redis.Redis, settings, hour: str) -> None:
        self.rds, self.settings, self.hour, self.n = rds, settings, hour, 0
        self.batches, self.appender = Batches(rds, settings), Appender(rds, settings)
        self.sealer = Sealer(rds, settings)
        self.lines: list[bytes] = []

    def batch(self, count: int = 3) -> None:
        lines = [b'{"app":"%s","n":%d}' % (APP.encode(), self.n + i) for i in range(count)]
        bid, piece = f"logs:0:{self.n}-{self.n + count - 1}", schema.app_hour(APP, self.hour)
        split_batch(self.batches, bid, {piece: b"\n".join(lines) + b"\n"})
        assert compress_pieces(self.batches, self.appender, CCTX, bid, [piece]) == 1
        self.n += count
        self.lines += lines

    def upload(self, store: FileStore, expect_some: bool = False) -> None:
        """Seal every file and upload it, as Beat's sweep and the upload tasks do."""
        self.sealer.seal_due(now=FAR_FUTURE)
        uploaded = upload_sealed(Uploader(self.rds, self.settings, store))
        assert uploaded >= 1 or not expect_some


def window(hour: str) -> tuple[datetime, datetime]:
    start = datetime.strptime(hour, "%Y%m%d%H").replace(tzinfo=timezone.utc)
    return start, start + timedelta(hours=1)


def fetch_all(store, settings, rds, hour: str) -> tuple[list[bytes], Fetch]:
    out = io.BytesIO()
    job = Fetch(store, Query(APP, *window(hour)), out, SpoolReader(rds, settings.spool_dir, settings.slots_per_app))
    job.run()
    return out.getvalue().split(b"\n")[:-1], job


def spool_files(spool: Path) -> dict[Path, tuple[int, int, bytes]]:
    """(size, mtime in ns, bytes) of every file in the spool."""
    out = {}
    for path in sorted(spool.rglob("*")):
        if path.is_file():
            st = path.stat()
            out[path] = (st.st_size, st.st_mtime_ns, path.read_bytes())
    return out


def test_open_and_sealed_files_are_read_up_to_their_committed_size(rds, settings):
    hour = "2026010109"
    spooled = Spooled(rds, settings, hour)
    store = FileStore(settings.spool_dir.parent / "archive")
    spooled.batch()
    spooled.sealer.seal_due(now=FAR_FUTURE)  # one sealed, not uploaded
    spooled.batch()
    [path] = open_files(settings)
    with open(path, "ab") as torn:  # a writer died after writing, before committing
        torn.write(b"\x28\xb5\x2f\xfd uncommitted")
    before = spool_files(settings.spool_dir)
    assert path in before and any("sealed" in p.parts for p in before), "an open and a sealed file"
    lines, job = fetch_all(store, settings, rds, hour)
    assert sorted(lines) == sorted(spooled.lines) and not job.damaged
    assert path.stat().st_size > 0, "fetch changed nothing in the spool"
    after = spool_files(settings.spool_dir)
    assert after.keys() == before.keys(), "fetch created or removed no file in the spool"
    changed = [str(p) for p in before if after[p] != before[p]]
    assert not changed, f"fetch changed nothing in the spool: size, bytes or mtime of {changed} differ"


class RacingStore(FileStore):
    """Seals and uploads the spool the moment fetch lists the store: after fetch has read the
    committed sizes, before it reads any file. The worst moment for a seal and an upload."""

    def __init__(self, root, spooled: Spooled) -> None:
        super().__init__(root)
        self.spooled, self.raced = spooled, 0

    def list(self, prefix: str) -> list[str]:
        if not self.raced:
            self.raced += 1
            self.spooled.batch()  # appended after the snapshot: the next fetch prints it
            self.spooled.upload(FileStore(self.root), expect_some=True)
            assert not list((self.spooled.settings.spool_dir / "sealed").rglob("*.zst"))
        return super().list(prefix)


def test_a_seal_and_an_upload_during_a_fetch_print_every_record_once(rds, settings):
    hour = "2026010110"
    spooled = Spooled(rds, settings, hour)
    for _ in range(3):
        spooled.batch()
    spooled.sealer.seal_due(now=FAR_FUTURE)
    spooled.batch()  # one sealed file and one open
    before = list(spooled.lines)
    store = RacingStore(settings.spool_dir.parent / "archive", spooled)
    lines, job = fetch_all(store, settings, rds, hour)
    assert store.raced == 1 and not job.damaged
    assert sorted(lines) == sorted(before) or sorted(lines) == sorted(spooled.lines)
    assert len(lines) == len(set(lines)), "nothing twice"
    lines, _ = fetch_all(store, settings, rds, hour)  # all of it in the store now
    assert sorted(lines) == sorted(spooled.lines)


def test_follow_goes_on_across_a_seal_an_upload_and_the_hour_boundary(rds, settings):
    first, second = "2026010111", "2026010112"
    now = [datetime(2026, 1, 1, 11, 59, 59, tzinfo=timezone.utc)]
    a, b = Spooled(rds, settings, first), Spooled(rds, settings, second)
    store = FileStore(settings.spool_dir.parent / "archive")
    out = io.BytesIO()
    job = Fetch(store, Query(APP, now[0] - timedelta(minutes=5), None), out,
                SpoolReader(rds, settings.spool_dir, settings.slots_per_app), clock=lambda: now[0])
    a.batch()
    job.run()
    stop = threading.Event()
    follower = threading.Thread(target=job.follow, args=(stop,))
    follower.start()
    try:
        a.batch()
        wait_until(lambda: job.count == 6, 10, "the new records of the open file")
        a.upload(store)
        a.batch()  # a new open file of the same hour
        now[0] = datetime(2026, 1, 1, 12, 0, 1, tzinfo=timezone.utc)  # the next hour begins
        b.batch()
        wait_until(lambda: job.count == 12, 10, "records after the seal, the upload and the hour change")
    finally:
        stop.set()
        follower.join()
    lines = out.getvalue().split(b"\n")[:-1]
    assert sorted(lines) == sorted(a.lines + b.lines) and len(lines) == 12


def test_without_redis_fetch_says_so_and_prints_the_store(tmp_path, rds, settings):
    hour = "2026010113"
    spooled = Spooled(rds, settings, hour)
    spooled.batch()
    spooled.upload(FileStore(tmp_path / "archive"))
    env = {**os.environ, "SLUICE_REDIS_URL": "redis://127.0.0.1:1/0", "SLUICE_SPOOL_DIR": str(settings.spool_dir),
           "SLUICE_STORE_URL": f"file://{tmp_path / 'archive'}"}
    start, end = window(hour)
    result = subprocess.run([sys.executable, "-m", "sluice.cli", "fetch", "--app", APP, "--since",
                             start.isoformat(), "--until", end.isoformat()], env=env, capture_output=True, timeout=60)
    assert result.returncode == 0
    assert b"Redis is not reachable" in result.stderr and b"only what the store has" in result.stderr
    assert sorted(result.stdout.split(b"\n")[:-1]) == sorted(spooled.lines)


def test_a_record_is_fetched_within_seconds_of_kafka_and_follow_ends_cleanly(stack_factory):
    stack = stack_factory()
    env = stack.env()
    app = "app-000"
    follower = subprocess.Popen([sys.executable, "-m", "sluice.cli", "fetch", "--app", app, "--since=-1m",
                                 "--follow"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    latencies: list[float] = []
    printed: list[int] = []  # the seq of each record printed, in order
    produced: dict[int, float] = {}
    warm = threading.Event()

    def read() -> None:
        for line in follower.stdout:
            doc = orjson.loads(line)
            if doc["seq"] < 0:
                warm.set()
            else:
                latencies.append(time.time() - produced[doc["seq"]])
                printed.append(doc["seq"])

    reader = threading.Thread(target=read)
    reader.start()
    producer = KafkaProducer(bootstrap_servers=stack.bootstrap, linger_ms=5)
    try:
        # Freshness in steady state: the bridge's group join and the workers' start come first.
        producer.send("logs", orjson.dumps({"app": app, "ts": time.time(), "seq": -1}))
        producer.flush()
        assert warm.wait(60), "the pipeline started"
        for seq in range(300):  # 30 s of steady traffic, 10 records a second
            produced[seq] = time.time()
            producer.send("logs", orjson.dumps({"app": app, "ts": produced[seq], "seq": seq}))
            producer.flush()
            time.sleep(0.1)  # the pace of the traffic, not a synchronisation
        wait_until(lambda: len(latencies) >= 300, 30, "every record printed")
    finally:
        producer.close()
        follower.send_signal(signal.SIGINT)
        rc = follower.wait(30)
        reader.join()
    assert rc == 0, follower.stderr.read()
    assert len(latencies) == 300, "each record once"
    twice = sorted(seq for seq, n in Counter(printed).items() if n > 1)
    missing = sorted(set(range(300)) - set(printed))
    assert not twice and not missing, f"each record once: printed twice {twice[:5]}, never {missing[:5]}"
    assert sorted(printed) == list(range(300))
    latencies.sort()
    p50, p99 = latencies[150], latencies[296]
    print(f"freshness p50 {p50:.2f}s p99 {p99:.2f}s")
    assert p99 < 5.0
