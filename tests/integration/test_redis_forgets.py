"""Redis may forget: under load, a Redis that loses its last seconds of acknowledged writes (its
AOF behind, a replica promoted), or comes back empty, costs no record and doubles none, and the
pipeline mends its state from the spool by itself (sluice.ops.repair)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from devstack import sample
from devstack.hosts import Hosts, why_not
from devstack.local import PROJECT_ROOT, LocalStack, free_port, start_pipeline, wait_until
from sluice.core import schema
from sluice.core.redis_client import client_for
from sluice.ops.repair import verified
from tests.integration.conftest import Traffic, assert_exactly_once, read_archive

pytestmark = pytest.mark.integration

RECORDS = 40_000
PER_SECOND = 1_000  # 40 s of load


def spool_left(stack: LocalStack) -> list[str]:
    """Batch payloads, pieces, slot files and set-aside files still in the spool."""
    root = stack.workdir / "spool"
    found = [*root.glob("batches/*.kafka"), *root.glob("pieces/*"), *root.glob("open/*/*/*"),
             *root.glob("sealed/*/*/*"), *root.glob("set-aside/*")]
    return sorted(str(p.relative_to(root)) for p in found)


def wait_all_archived(stack: LocalStack, seqs: set[int], timeout: float = 300) -> float:
    """Until every seq is in the archive and nothing is in flight, open, sealed or left in the
    spool; when that was. Read from the archive and the spool, not from Redis's counters, which
    went back with the state."""
    r = client_for(stack.redis_url, socket_timeout=5)

    def done() -> bool:
        stack.check_alive()
        if r.zcard(schema.INFLIGHT) or r.scard(schema.SLOTS) or r.hlen(schema.SEALED) or spool_left(stack):
            return False
        archived = {int(line.split(b'"seq":', 1)[1].split(b",", 1)[0]) for _, line in read_archive(
            stack.workdir / "archive") if b'"seq":' in line}
        return seqs <= archived

    wait_until(done, timeout, f"{len(seqs)} records archived and the spool empty", interval=1.0)
    return time.monotonic()


def archived_once(stack: LocalStack, traffic: Traffic, since: float, what: str) -> dict[str, str]:
    """The load finished, every record archived once with the spool empty, and no file set aside;
    the repairs Redis recorded, printed with how long the backlog took to clear after `what`."""
    assert traffic.thread.is_alive(), f"the load ended before {what}: the test tests less than it says"
    traffic.finish()
    done = wait_all_archived(stack, traffic.seqs)
    assert_exactly_once(stack.workdir / "archive", traffic.seqs)
    r = client_for(stack.redis_url, socket_timeout=5)
    repairs = {k.decode(): v.decode() for k, v in r.hgetall(schema.REPAIRS).items()}
    print(f"repairs: {repairs}; backlog cleared {done - since:.1f} s after {what}")
    assert int(repairs.get("set_aside_total", 0)) == 0, repairs
    return repairs


def load(stack: LocalStack, seed: int) -> Traffic:
    values = [v for _, v in sample.lines(RECORDS, sample.app_names(40), time.time() - 3600, 3600, seed=seed)]
    return Traffic(stack, lines=values, per_second=PER_SECOND)


@pytest.fixture
def stack(tmp_path: Path):
    stack = start_pipeline(tmp_path / "stack")
    yield stack
    stack.close()


def test_redis_losing_its_last_seconds_twice_loses_and_doubles_nothing(stack: LocalStack):
    """Twice under load, Redis restarts from its state of 5 s before (a replica 5 s behind
    promoted, an AOF that lost its last seconds): every record is archived once, nothing stays in
    flight or in the spool, no process is restarted, and each repair is recorded as behind."""
    r = redis.Redis.from_url(stack.redis_url)
    traffic = load(stack, seed=61)
    cleared = []
    for at in (8.0, 22.0):
        wait_until(lambda at=at: time.monotonic() - traffic.started >= at, 60, f"{at:.0f} s of load")
        before = stack.copy_redis_state()
        time.sleep(5)
        stack.restart_redis_from(before)
        cleared.append(time.monotonic())
        wait_until(lambda: verified(r), 60, "the state repaired after the rollback")
    repairs = archived_once(stack, traffic, cleared[-1], "the second restart")
    assert int(repairs.get("repairs_behind", 0)) >= 1, repairs
    # The operator knows: `sluice status` and the bridge's metrics say so.
    status = subprocess.run([sys.executable, "-m", "sluice.cli", "status", "--json"], env=stack.env(),
                            capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT)
    assert json.loads(status.stdout)["last_repair"]["last_run_id"] == repairs["last_run_id"], status.stderr
    served = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['bridge']}/metrics", timeout=10)
    behind = re.search(r'^sluice_redis_repairs_total\{kind="behind"\} (\S+)$', served.read().decode(), re.M)
    assert behind and float(behind.group(1)) == float(repairs["repairs_behind"]), behind


def test_redis_back_empty_loses_and_doubles_nothing(stack: LocalStack):
    """Under load, Redis comes back with nothing (a FLUSHALL, a new instance): every record is
    archived once, from the spool and Kafka's committed offsets, and the repair says so."""
    traffic = load(stack, seed=62)
    wait_until(lambda: time.monotonic() - traffic.started >= 15, 60, "15 s of load")
    stack.restart_redis_from(None)
    repairs = archived_once(stack, traffic, time.monotonic(), "the restart")
    assert int(repairs.get("repairs_empty", 0)) == 1, repairs


def test_a_sentinel_failover_to_a_replica_behind_loses_and_doubles_nothing(tmp_path: Path):
    """Self-hosted HA Redis under load: a master, a replica on another host and three Sentinels,
    SLUICE_REDIS_URL naming the Sentinels. The replication link is cut for 5 s (iptables on the
    replica's host), then the master dies and the Sentinels promote the replica, which never saw
    those 5 s of writes. Every process finds the new master by itself, the state is repaired, and
    every record is archived once."""
    if reason := why_not():
        pytest.skip(reason)
    hosts = Hosts(tmp_path, ["replica"])
    replica_port = free_port()

    def high_availability(stack: LocalStack) -> None:
        stack.start_redis(name="replica", port=replica_port, replica_of=stack.redis_port,
                          on=(hosts["replica"].address, hosts["replica"].wrap))
        stack.start_sentinels(stack.redis_port)
        wait_until(lambda: len(sentinel(stack).sentinel_slaves("sluice")) == 1, 30, "the Sentinels to see the replica")

    try:
        stack = start_pipeline(tmp_path / "stack", address=hosts.gateway, before_workers=high_availability)
    except BaseException:
        hosts.close()
        raise
    try:
        r = client_for(stack.redis_url, socket_timeout=5)
        traffic = load(stack, seed=63)
        wait_until(lambda: time.monotonic() - traffic.started >= 10, 60, "10 s of load")
        hosts.partition("replica", stack.redis_port)  # the replication link: the master goes on alone
        time.sleep(5)
        stack.kill("redis")  # the master dies with what the replica never saw
        hosts.heal("replica")
        wait_until(lambda: int(sentinel(stack).execute_command("SENTINEL", "get-master-addr-by-name", "sluice")[1])
                   == replica_port, 60, "the Sentinels to promote the replica")
        repairs = archived_once(stack, traffic, time.monotonic(), "the promotion")
        assert repairs["last_run_id"] == str(r.info("server")["run_id"]), "the new master's state was repaired"
        assert repairs["last_kind"] == "behind", repairs
    finally:
        try:
            stack.close()
        finally:
            hosts.close()


def sentinel(stack: LocalStack) -> redis.Redis:
    """A client of the stack's first Sentinel."""
    return redis.Redis.from_url(f"redis://{stack.sentinel_url.split('//')[1].split(',')[0]}")


def test_what_the_repair_cannot_account_for_is_set_aside_and_reported(redis_only: LocalStack, settings):
    """Bad input to a repair: an open slot file with bytes but no whole announced frame, and a
    payload whose offsets another batch already handed over. Each is moved to set-aside/ with a
    WARNING naming it, counted, and nothing is deleted; the rest of the repair goes on."""
    from sluice.formats.records import Router
    from sluice.handover.batches import Batches
    from sluice.ops.repair import ensure_verified

    r = redis.Redis.from_url(redis_only.redis_url)
    spool = settings.spool_dir
    garbage = spool / "open" / "billing" / "2026120805" / "2026120805-00000000000000aa.jsonl.zst"
    garbage.parent.mkdir(parents=True)
    garbage.write_bytes(b"not a zstd frame at all")
    batches = Batches(r, settings)
    batches.hand_over(schema.batch_id("logs", 0, 0, 99), "logs", 0, None, 99, [b"x" * 10])
    leftover = spool / "batches" / f"{schema.batch_id('logs', 0, 50, 149)}.kafka"
    leftover.write_bytes(b"y" * 10)  # a hand-over that never ran: offsets 50-99 are the batch's above
    r.delete(schema.VERIFIED)  # as a restarted server
    report = ensure_verified(r, settings, Router(settings.app_id_source, settings.timestamp_field,
                                                 settings.record_max_bytes))
    assert report is not None and len(report.set_aside) == 2, report
    aside = sorted(p.name for p in (spool / "set-aside").iterdir())
    assert aside == sorted([garbage.name, leftover.name])
    assert (spool / "set-aside" / garbage.name).read_bytes() == b"not a zstd frame at all"
    assert (spool / "set-aside" / leftover.name).read_bytes() == b"y" * 10
    assert r.hget(schema.REPAIRS, "set_aside_total") == b"2"
    assert report.batches_resplit == 1, "the rest of the repair went on: the known batch was split"
