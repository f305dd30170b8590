"""An operator's bad day: a full spool disk, a worker frozen past its lease, a poison header,
a topic deleted and recreated. Each on the whole real stack; afterwards every record is
archived exactly once, or kept in quarantine when no client can decode it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import redis

from devstack import sample
from devstack.local import LocalStack, wait_until
from devstack.progress import compressed, handed_over
from sluice.core import schema
from sluice.core.redis_client import server_time
from sluice.core.schema import BatchState
from sluice.ops import queues
from tests.integration.conftest import Traffic, assert_exactly_once, flocks_of, group_pids, read_archive, wait_archived
from tests.integration.kcat import kcat

pytestmark = pytest.mark.integration

# A split batch's state as Redis returns it (bytes), from the schema's BatchState.
SPLIT = BatchState.SPLIT.value.encode()


@pytest.fixture
def small_disk(tmp_path):
    """A 20 MB tmpfs for the spool (the tests run as root), unmounted afterwards."""
    mount = tmp_path / "spool-fs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path, leave: int) -> Path:
    """Fill the file system but for `leave` bytes."""
    filler = disk / "filler"
    stat = os.statvfs(disk)
    with open(filler, "wb") as fh:
        fh.write(b"\0" * (stat.f_bavail * stat.f_frsize - leave))
    return filler


def committed_within_files(r: redis.Redis, spool: Path) -> bool:
    """No slot's committed size is larger than its file: nothing short was committed."""
    for key in r.scan_iter(schema.SLOT_STATE_PREFIX + "*"):
        state = r.hgetall(key)
        app, hour, _ = schema.parse_slot_id(key.decode().removeprefix(schema.SLOT_STATE_PREFIX))
        path = spool / "open" / app / hour / f"{state[b'fid'].decode()}.jsonl.zst"
        size = path.stat().st_size if path.exists() else 0
        if int(state[b"size"]) > size:
            return False
    return True


@pytest.mark.parametrize("claim_check", ["redis", "spool"])
def test_a_full_spool_disk_pauses_the_pipeline_until_space_is_back(stack_factory, small_disk, claim_check):
    filler = fill(small_disk, leave=96 * 1024)
    stack = stack_factory(SLUICE_SPOOL_DIR=str(small_disk), SLUICE_CLAIM_CHECK=claim_check)
    r = redis.Redis.from_url(stack.redis_url)
    now = time.time()
    lines = [json.dumps({"app": "bulk", "ts": now, "seq": i, "blob": os.urandom(1000).hex()}).encode()
             for i in range(3000)]
    traffic = Traffic(stack, lines=lines)
    traffic.finish()
    # The side that writes to the spool first meets the full disk and waits: the bridge for
    # spooled batches, else the split writing the pieces.
    waiting = stack.service("bridge" if claim_check == "spool" else "io").log
    wait_until(lambda: waiting.read_text(errors="replace").count("No space left on device") >= 2, 120,
               "writes to meet the full disk twice")
    stack.check_alive()
    assert compressed(r) < len(lines), "the disk filled up too late to test anything"
    assert committed_within_files(r, small_disk)
    filler.unlink()  # space is back
    wait_archived(stack, len(lines))
    assert_exactly_once(stack.workdir / "archive", traffic.seqs)
    # Checked once all is done: while the disk is full, a retry may be mid-write at any moment.
    assert not list(small_disk.rglob("*.tmp")), "a write the full disk cut short leaves no .tmp behind"


# The slot lease of the frozen-worker test, and how long each freeze lasts: longer than the lease,
# which outlives the compress time limit. Small bundles keep each level-19 task well inside it.
LEASE_SECONDS = 8.0
FREEZE_SECONDS = LEASE_SECONDS + 3


def freeze_holding_a_slot_file(leader: int, timeout: float) -> set[int]:
    """SIGSTOP the process group the moment one of its processes holds a slot file's kernel
    lock (it holds that slot's lease then: taken before the file lock, given up by the commit just
    before the file lock is), polling as fast as /proc allows; the inodes it holds locked, frozen.
    Frozen all the same, holding none, if that did not happen within `timeout`."""
    deadline = time.monotonic() + timeout
    pids, refreshed = group_pids(leader), time.monotonic()
    while time.monotonic() < deadline:
        if flocks_of(pids):
            os.killpg(leader, signal.SIGSTOP)
            if held := flocks_of(group_pids(leader)):
                return held
            os.killpg(leader, signal.SIGCONT)  # it let go in between: again
        if time.monotonic() - refreshed > 1:  # a pool process replaced (a time limit) is a new pid
            pids, refreshed = group_pids(leader), time.monotonic()
    os.killpg(leader, signal.SIGSTOP)
    return set()


def slots_of_files(r: redis.Redis, spool: Path, inodes: set[int]) -> set[str]:
    """The slot ids whose current file (spool/open/<app>/<hour>/<fid>.jsonl.zst) has one of these inodes."""
    fids = set()
    for path in (spool / "open").rglob("*.jsonl.zst"):
        try:
            if path.stat().st_ino in inodes:
                fids.add(path.name.removesuffix(".jsonl.zst"))
        except FileNotFoundError:
            continue  # sealed meanwhile: not the file of a frozen writer
    return {key.decode().removeprefix(schema.SLOT_STATE_PREFIX) for key in r.scan_iter(
            match=f"{schema.SLOT_STATE_PREFIX}*") if (r.hget(key, "fid") or b"").decode() in fids}


class LeaseEvents(threading.Thread):
    """What happens to the slot leases (sluice:lock:<slot id>), from Redis keyspace notifications:
    (monotonic time, slot id, event), the events `set` (taken), `del` (released) and `expired`
    (lapsed: nobody gave it up)."""

    def __init__(self, r: redis.Redis) -> None:
        super().__init__(daemon=True)
        r.config_set("notify-keyspace-events", "Kg$x")
        self.pubsub = r.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe(f"__keyspace@0__:{schema.SLOT_LOCK_PREFIX}*")
        self.events: list[tuple[float, str, str]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        channel = len(f"__keyspace@0__:{schema.SLOT_LOCK_PREFIX}")
        while not self.stopping.is_set():
            message = self.pubsub.get_message(timeout=0.2)
            if message is not None:
                sid = message["channel"].decode()[channel:]
                if sid.count("|") == 2:  # a slot's lease (app|hour|k), not the sweep's or an upload's lock
                    self.events.append((time.monotonic(), sid, message["data"].decode()))

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.pubsub.close()


def fenced_takeovers(stack: LocalStack, leases: LeaseEvents,
                     freezes: list[tuple[float, float, set[str], set[str]]]) -> tuple[list[str], list[str]]:
    """The slots whose lease the frozen worker held, lapsed during a freeze and taken over; and of
    those, the ones whose taker met the frozen worker's kernel lock on the slot's file.

    A lease held when cpu0 was frozen that lapsed during the freeze was cpu0's (cpu1 and the sweep
    give up each lease they take, by a commit or a release); taken over if set again before cpu0
    woke (by cpu1 appending, or by the sweep sealing). The fence: whoever took it met that kernel
    lock and wrote nothing (its warning names the slot)."""
    taken_over: list[str] = []
    fenced: list[str] = []
    logs = {service.name: service.log.read_text(errors="replace") for service in stack.services}
    for stopped, continued, held, files in freezes:
        for sid in held:
            events = [(at, event) for at, s, event in leases.events if s == sid and stopped < at < continued]
            lapsed = [at for at, event in events if event == "expired"]
            if lapsed and any(event == "set" and at > lapsed[0] for at, event in events):
                taken_over.append(sid)
                met = f"slot {sid}: its file is locked by another process"
                if sid in files and any(met in logs.get(name, "") for name in ("cpu1", "io")):
                    fenced.append(sid)
    return taken_over, fenced


def test_a_worker_frozen_past_its_lease_destroys_nothing(stack_factory):
    """cpu0 is frozen (SIGSTOP) the moment it holds a slot file, its lease and its kernel lock,
    for longer than the lease, under load, until a freeze has shown the fence (five at most). Its
    leases lapse while it is frozen and are taken over (by cpu1 appending, or by the sweep
    sealing): the fenced path runs, the taker meeting the frozen writer's kernel lock and writing
    nothing. Every record archived once."""
    # Level 19 keeps both workers busy; each freeze outlasts the lease.
    stack = stack_factory(SLUICE_ZSTD_LEVEL="19", cpu_workers=2, SLUICE_LOCK_LEASE_SECONDS=str(LEASE_SECONDS),
                          SLUICE_COMPRESS_TIME_LIMIT=str(LEASE_SECONDS - 2),
                          SLUICE_COMPRESS_BUNDLE_BYTES=str(1024 * 1024))
    r = redis.Redis.from_url(stack.redis_url)
    leases = LeaseEvents(r)
    leases.start()
    values = [v for _, v in sample.lines(60_000, sample.app_names(4), time.time() - 600, 600, seed=5)]
    waves = [values[i::5] for i in range(5)]
    produced: list[bytes] = []
    frozen = stack.service("cpu0")
    # (stopped, continued, slot leases held then, slots whose file the frozen worker held locked)
    freezes: list[tuple[float, float, set[str], set[str]]] = []
    try:
        for wave in waves:
            traffic = Traffic(stack, lines=wave)
            traffic.finish()
            produced += wave
            wait_until(lambda: queues.unacked(r, "cpu") > 0, 60, "compress tasks under way")
            try:
                locked = freeze_holding_a_slot_file(frozen.proc.pid, 60)
                stopped = time.monotonic()
                held = {sid for key in r.scan_iter(match=f"{schema.SLOT_LOCK_PREFIX}*|*")
                        if (sid := key.decode().removeprefix(schema.SLOT_LOCK_PREFIX)).count("|") == 2}
                files = slots_of_files(r, stack.workdir / "spool", locked)
                time.sleep(FREEZE_SECONDS)  # the fault itself: frozen for longer than the lease
            finally:
                continued = time.monotonic()
                os.killpg(frozen.proc.pid, signal.SIGCONT)
            freezes.append((stopped, continued, held, files))
            wait_until(lambda: queues.unacked(r, "cpu") == 0 or fenced_takeovers(stack, leases, freezes)[1], 30,
                       "the takers to log what they met")
            if fenced_takeovers(stack, leases, freezes)[1]:
                break  # seen: the waves left are not needed (up to five freezes, for a slow machine)
        wait_archived(stack, len(produced), timeout=400)
    finally:
        leases.stop()

    taken_over, fenced = fenced_takeovers(stack, leases, freezes)
    print(f"{len(freezes)} freezes, holding {[len(f) for *_, f in freezes]} slot files; {len(taken_over)} slot "
          f"leases of the frozen worker lapsed and taken over, {len(fenced)} of them fenced by the kernel lock")
    assert taken_over, "no freeze caught the worker holding a slot lease that lapsed and was taken over"
    assert fenced, "no slot taken over from the frozen worker met its kernel lock: the fenced path never ran"
    seqs = [json.loads(v)["seq"] for v in produced]
    assert_exactly_once(stack.workdir / "archive", set(seqs))


def test_a_header_name_no_client_decoding_it_can_read_goes_to_quarantine(stack_factory):
    stack = stack_factory()
    bridge = stack.service("bridge")
    good = [json.dumps({"app": "billing", "ts": time.time(), "seq": i}).encode() for i in range(2000)]
    poison = b'{"app": "billing", "msg": "poison header"}'
    os.killpg(bridge.proc.pid, signal.SIGSTOP)  # so the bad record shares a fetch with good ones
    try:
        sample.produce(stack.bootstrap, "logs", good[:1000], partition=0)
        body = stack.workdir / "poison.json"
        body.write_bytes(poison)
        # A header name that is not UTF-8, sent by Debian's kcat (surrogateescape gives the raw bytes).
        kcat(stack.workdir, "-P", "-b", stack.bootstrap, "-t", "logs", "-p", "0",
             "-H", "h\udcff\udcfe=value", str(body))
        sample.produce(stack.bootstrap, "logs", good[1000:], partition=0)
    finally:
        os.killpg(bridge.proc.pid, signal.SIGCONT)
    wait_archived(stack, len(good) + 1)
    assert_exactly_once(stack.workdir / "archive", set(range(len(good))))
    [envelope] = [json.loads(line) for _, line in read_archive(stack.workdir / "archive" / "app=_quarantine")]
    assert envelope["reason"] == "undecodable_header"
    assert (envelope["topic"], envelope["partition"], envelope["offset"]) == ("logs", 0, 1000)
    assert base64.b64decode(envelope["value_b64"]) == poison
    [[shown, value_b64, name_b64]] = envelope["headers"]
    assert base64.b64decode(name_b64) == b"h\xff\xfe" and base64.b64decode(value_b64) == b"value"
    assert shown == "h\\xff\\xfe"


def test_a_topic_deleted_and_recreated_is_archived_again(stack_factory):
    from kafka.admin import KafkaAdminClient

    stack = stack_factory()
    values = [v for _, v in sample.lines(6000, sample.app_names(5), time.time() - 600, 600, seed=9)]
    sample.produce(stack.bootstrap, "logs", values[:3000])
    wait_archived(stack, 3000)
    admin = KafkaAdminClient(bootstrap_servers=stack.bootstrap, client_id="sluice-test")
    try:
        admin.delete_topics(["logs"])
    finally:
        admin.close()
    stack.create_topic("logs", 4)  # the new incarnation: offsets start at 0 again
    sample.produce(stack.bootstrap, "logs", values[3000:])
    wait_archived(stack, 6000)
    assert_exactly_once(stack.workdir / "archive", set(range(6000)))
    bridge_log = stack.service("bridge").log.read_text()
    assert "WARNING" in bridge_log and "incarnation 1" in bridge_log


REDRIVE_AFTER_SECONDS = 5


def test_redrive_leaves_work_alone_while_it_waits_in_the_queue(stack_factory):
    stack = stack_factory(SLUICE_REDRIVE_AFTER_SECONDS=str(REDRIVE_AFTER_SECONDS))
    r = redis.Redis.from_url(stack.redis_url)
    stack.kill("cpu0")  # a cpu worker outage
    traffic = Traffic(stack, records=20_000)
    traffic.finish()

    def all_split() -> bool:
        # A split task marks its batch split before it sends the compress tasks; it holds its
        # message in its queue's unacked hash until it returns (acks_late; sluice.ops.queues).
        batches = r.zrange(schema.INFLIGHT, 0, -1)
        return handed_over(r) >= 20_000 and r.llen("io") == 0 and queues.unacked(r, "io") == 0 and all(
            r.get(schema.batch_state(b.decode())) == SPLIT for b in batches)

    wait_until(all_split, 120, "every batch split, its compress tasks queued")
    queued = r.llen("cpu")
    assert queued > 0
    io = stack.service("io").log
    window_start, began = io.stat().st_size, server_time(r)
    # The outage lasts three redrive ages (a redrive sweep runs every half age).
    time.sleep(3 * REDRIVE_AFTER_SECONDS)
    with open(io, "rb") as log:
        log.seek(window_start)
        window = log.read().decode(errors="replace")  # what the io worker logged during the outage
    io_log = io.read_text()
    assert window.count("sluice.redrive") >= 4, "the redrive sweep ran during the outage"
    runs = re.findall(r"Task sluice\.redrive\[[^\]]+\] succeeded", window)
    assert len(runs) >= 2, f"{len(runs)} redrive sweeps finished during the outage"
    # Each found every batch stale, looked for its tasks in the queue and left it (touching it):
    # every batch in flight was looked at during the outage, when it was older than the redrive age.
    inflight = r.zrange(schema.INFLIGHT, 0, -1, withscores=True)
    assert inflight and all(score > began for _, score in inflight), \
        "the redrive sweep looked at every batch in flight during the outage"
    assert "redriving batch" not in io_log
    assert r.llen("cpu") == queued, "nothing was queued twice"
    stack.start_cpu_worker(name="cpu1")
    wait_archived(stack, 20_000)
    assert_exactly_once(stack.workdir / "archive", traffic.seqs)


def test_backpressure_keeps_redis_and_the_spool_under_the_bound(stack_factory):
    bound = 4 * 1024 * 1024
    stack = stack_factory(SLUICE_MAX_INFLIGHT_BYTES=str(bound), SLUICE_BATCH_MAX_BYTES=str(512 * 1024))
    r = redis.Redis.from_url(stack.redis_url)
    baseline = int(r.info("memory")["used_memory"])
    stack.kill("cpu0")  # nothing is compressed: what is handed over stays in flight
    traffic = Traffic(stack, records=80_000)  # about 22 MB, five times the bound, waits in Kafka
    traffic.finish()
    bridge_log = stack.service("bridge").log
    wait_until(lambda: "pausing consumption" in bridge_log.read_text(), 120, "the bridge to pause")

    def settled_while_paused() -> bool:
        batches = r.zrange(schema.INFLIGHT, 0, -1)
        return r.llen("io") == 0 and all(r.get(schema.batch_state(b.decode())) == SPLIT for b in batches)

    wait_until(settled_while_paused, 60, "every handed-over batch split")
    assert handed_over(r) < 80_000 / 2, "most records still wait in Kafka"
    inflight = int(r.get(schema.INFLIGHT_BYTES))
    assert 0 < inflight <= bound
    assert int(r.info("memory")["used_memory"]) - baseline < bound + 2 * 1024 * 1024
    spool = stack.workdir / "spool"
    assert sum(p.stat().st_size for p in spool.rglob("*") if p.is_file()) < bound
    stack.start_cpu_worker(name="cpu1")
    wait_archived(stack, 80_000)
    assert_exactly_once(stack.workdir / "archive", traffic.seqs)
    assert "resuming consumption" in bridge_log.read_text()
    assert int(r.get(schema.INFLIGHT_BYTES)) == 0
