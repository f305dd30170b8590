"""The fault matrix: kill or cut off each part mid-run; afterwards no record is lost or doubled.

Each test runs a whole pipeline (real redis-server, Tansu, Celery workers, Beat, bridge),
produces traffic, injects one fault at a moment it can observe (not after a sleep), recovers
the way an operator or a supervisor would, and checks the archive with the zstd CLI.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import pytest
import redis

from devstack.local import FAST, LocalStack, free_port, wait_until
from devstack.progress import compressed, handed_over
from sluice.core import schema
from sluice.ops import queues
from tests.integration.conftest import Traffic, assert_exactly_once, wait_archived

pytestmark = pytest.mark.integration

RECORDS = 60_000


def test_bridge_sigkill_mid_run(stack_factory):
    stack = stack_factory()
    r = redis.Redis.from_url(stack.redis_url)
    traffic = Traffic(stack)
    wait_until(lambda: handed_over(r) > RECORDS * 0.1, 120, "the bridge to hand over batches")
    stack.kill("bridge")
    assert handed_over(r) < RECORDS, "the kill came too late to test anything"
    traffic.finish()
    stack.start_bridge("bridge2")  # replays from the last commit; the ledger trims what was handed over
    wait_archived(stack, RECORDS)
    assert_exactly_once(stack.workdir / "archive", traffic.seqs)


def test_a_bridge_started_before_kafka_and_redis_waits_for_them(tmp_path: Path):
    """Started while neither Kafka nor Redis answers, the bridge waits for each (it does not exit
    for a supervisor to restart) and, once they are up, hands over every record exactly once."""
    stack = LocalStack(tmp_path / "stack", dict(FAST))
    try:
        stack.redis_port, stack.kafka_port = free_port(), free_port()  # nothing listens on either yet
        bridge = stack.start_bridge()
        wait_until(lambda: f"connecting to Kafka at {stack.bootstrap} failed" in bridge.log.read_text(), 60,
                   "the bridge to meet no broker")
        stack.start_kafka()
        wait_until(lambda: "checking Redis's state against the spool failed" in bridge.log.read_text(), 60,
                   "the bridge to meet no Redis")
        stack.start_redis()
        stack.create_topic("logs", 4)
        stack.start_io_worker()
        stack.start_cpu_worker()
        stack.start_beat()
        traffic = Traffic(stack, records=10_000)
        traffic.finish()
        wait_archived(stack, 10_000)  # fails at once if the bridge exited meanwhile
        assert_exactly_once(stack.workdir / "archive", traffic.seqs)
    finally:
        stack.close()


def test_io_worker_sigkill_mid_split(stack_factory):
    # Batches of 5,000 records: with the default 100,000 the 60,000 records, all waiting in Kafka
    # by the time the bridge has joined, make one split per partition, over before the kill.
    stack = stack_factory(SLUICE_BATCH_MAX_RECORDS="5000")
    r = redis.Redis.from_url(stack.redis_url)
    traffic = Traffic(stack)
    wait_until(lambda: compressed(r) > RECORDS * 0.05 and queues.unacked(r, "io") > 0
               and r.zcard(schema.INFLIGHT) > 0, 120, "split tasks under way")
    stack.kill("io")
    traffic.finish()
    stack.start_io_worker(name="io2")
    wait_archived(stack, RECORDS)
    assert_exactly_once(stack.workdir / "archive", traffic.seqs)


def test_cpu_worker_sigkill_mid_append(stack_factory):
    # Level 19 makes compression slow, so the kill lands while frames are built and appended.
    stack = stack_factory(SLUICE_ZSTD_LEVEL="19")
    r = redis.Redis.from_url(stack.redis_url)
    traffic = Traffic(stack)
    wait_until(lambda: compressed(r) > RECORDS * 0.05 and queues.unacked(r, "cpu") > 0, 120,
               "compression under way")
    stack.kill("cpu0")
    assert compressed(r) < RECORDS, "the kill came too late to test anything"
    traffic.finish()
    stack.start_cpu_worker(name="cpu1")
    wait_archived(stack, RECORDS, timeout=400)
    assert_exactly_once(stack.workdir / "archive", traffic.seqs)


def test_beat_and_io_worker_sigkill_mid_upload(stack_factory):
    stack = stack_factory()
    archive = stack.workdir / "archive"
    # Incompressible 4 kB records of one app and hour make slot files of tens of MB, so an
    # upload takes long enough to be caught in the act.
    now = time.time()
    lines = [json.dumps({"app": "bulk", "ts": now, "seq": i, "blob": os.urandom(2000).hex()}).encode()
             for i in range(15_000)]
    traffic = Traffic(stack, lines=lines)

    def uploading() -> bool:
        return any(archive.rglob("*.part")) if archive.exists() else False

    wait_until(uploading, 180, "an upload in progress", interval=0.002)
    stack.kill("io")
    stack.kill("beat")
    partial = list(archive.rglob("*.part"))
    traffic.finish()
    stack.start_io_worker(name="io2")
    stack.start_beat()
    wait_archived(stack, len(lines))
    assert partial, "the kill should have left a partial upload behind"
    assert not list(archive.rglob("*.part")), "the repeated upload replaces the partial one"
    assert_exactly_once(archive, traffic.seqs)


def test_redis_crash_and_restart_mid_run(stack_factory):
    stack = stack_factory()
    r = redis.Redis.from_url(stack.redis_url)
    # Paced (about ten seconds of load): unpaced, the whole run could be compressed by the time
    # the poll below saw a fifth of it, and the crash came after the run, not in it.
    traffic = Traffic(stack, per_second=6_000)
    wait_until(lambda: compressed(r) > RECORDS * 0.2, 120, "a fifth of the records compressed")
    # Mid-run: records still being produced, and not all compressed, the moment before the crash.
    producing, before = traffic.thread.is_alive(), compressed(r)
    stack.crash_redis()  # SIGKILL: a new server (run id), whose state is checked before anyone acts
    assert producing and before < RECORDS, "the crash came too late to test anything"
    traffic.finish()
    wait_archived(stack, RECORDS, timeout=400)
    assert_exactly_once(stack.workdir / "archive", traffic.seqs)


# A store outage: fifteen upload sweeps (SLUICE_UPLOAD_INTERVAL_SECONDS is 1 s in the tests).
OUTAGE_SECONDS = 15
# How many sweeps (each sends a new upload task of the app-hour) at least one sealed file must
# have failed in for the outage to count as lasting many sweeps, not one failed attempt.
MANY_SWEEPS = 5
# A failed upload as the io worker logs it: of a sealed file (app|hour|fid), or of an hour's tail
# files (the hour), said by the uploader or by the tail task.
FAILED_UPLOAD = re.compile(r"ERROR/[^\]]*\] (?:[\w.]+\[[\w-]+\]: )?archiving (?:the tail files of )?(\S+) failed, "
                           r"will retry")


def test_store_unavailable_for_many_sweeps(stack_factory):
    stack = stack_factory()
    archive = stack.workdir / "archive"
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_text("not a directory: the store is down\n")  # every upload now fails
    r = redis.Redis.from_url(stack.redis_url)
    down_since = time.monotonic()
    traffic = Traffic(stack)
    traffic.finish()
    wait_until(lambda: compressed(r) >= RECORDS and r.hlen(schema.SEALED) > 0, 120,
               "sealed files waiting for the store")
    io_log = stack.service("io").log
    wait_until(lambda: "archiving" in io_log.read_text() and "failed, will retry" in io_log.read_text(),
               60, "a failed upload attempt")
    wait_until(lambda: time.monotonic() - down_since >= OUTAGE_SECONDS, OUTAGE_SECONDS + 10,
               "the outage to last its length", interval=1)

    def failures() -> Counter[str]:
        """Failed uploads of each sealed file (or hour of tail files) so far."""
        return Counter(FAILED_UPLOAD.findall(io_log.read_text()))

    # Many sweeps, each sending the file's app-hour again, meet the store down: the same sealed
    # file fails in that many upload tasks, each a task of its own (no retry within a task).
    wait_until(lambda: max(failures().values(), default=0) >= MANY_SWEEPS, 60,
               f"a sealed file to fail in {MANY_SWEEPS} sweeps, the store down all along", interval=0.5)
    assert r.hlen(schema.SEALED) > 0 and not any(Path(stack.workdir).rglob("*.jsonl.zst.part"))
    text = io_log.read_text()
    failed = Counter(FAILED_UPLOAD.findall(text))
    [(entry, attempts)] = failed.most_common(1)
    failed_tasks = len(re.findall(r"Task sluice\.(?:upload_app_hour|archive_tail)\[[\w-]+\] raised unexpected", text))
    print(f"{len(failed)} sealed files failed to upload; {entry} in {attempts} tasks; "
          f"{failed_tasks} upload tasks failed")
    assert attempts >= MANY_SWEEPS, f"{entry} failed in only {attempts} upload tasks: not many sweeps"
    assert failed_tasks >= MANY_SWEEPS, f"only {failed_tasks} upload tasks failed: not many sweeps"
    assert int(r.hget(schema.COUNTERS, schema.Counter.UPLOADS_FAILED.value) or 0) >= sum(failed.values())
    sealed = [key.decode() for key in r.hkeys(schema.SEALED)]
    assert entry in sealed or any(key.startswith(f"{schema.TAIL_APP}|{entry}|") for key in sealed), \
        "what failed most is still sealed, still there"
    archive.unlink()  # the store is back
    wait_archived(stack, RECORDS)
    assert_exactly_once(archive, traffic.seqs)
