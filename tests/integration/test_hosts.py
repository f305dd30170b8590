"""The pipeline across hosts: the bridge, an io worker and two cpu workers each in a network
namespace of its own with its own spool view, under steady load, through partitions, packet loss,
a hung spool mount and a host lost for good. Each ends with every record archived exactly once,
at most N objects per app-hour, nothing left in the spool or in Redis, and every process working
again; the liveness figures are measured and printed."""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from devstack import sample
from devstack.hosts import Hosts, rate, why_not
from devstack.local import FAST, LocalStack, Service, wait_until
from devstack.progress import compressed, handed_over, settled
from sluice.core import schema
from sluice.core.redis_client import KEEPALIVE_OPTIONS
from tests.integration.conftest import assert_exactly_once, flocks_of, group_pids

pytestmark = pytest.mark.integration

LOAD = 600  # records per second, as in the bad day
# The timeouts a fault outlasts, shorter than FAST's so that the faults can be: the slot lease,
# the compress time limit, the redrive age (a worker's Redis keepalive finds a dead connection
# in 11 s, whatever the settings).
LEASE = 12
TIMEOUTS = {"SLUICE_LOCK_LEASE_SECONDS": str(LEASE), "SLUICE_COMPRESS_TIME_LIMIT": "10",
            "SLUICE_REDRIVE_AFTER_SECONDS": "10"}


class SteadyLoad(threading.Thread):
    """LOAD records a second of 12 apps, each with its own seq, until stopped."""

    def __init__(self, stack: LocalStack) -> None:
        super().__init__(daemon=True)
        self.stack, self.sent, self.stopping = stack, 0, threading.Event()

    def run(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.stack.bootstrap, linger_ms=20)
        apps = sample.app_names(12)
        while not self.stopping.is_set():
            began = time.monotonic()
            lines = sample.lines(LOAD // 10, apps, time.time() - 60, 60, seed=self.sent)
            for i, (_, line) in enumerate(lines):
                producer.send("logs", line.replace(b'"seq":%d,' % i, b'"seq":%d,' % (self.sent + i), 1))
            producer.flush()
            self.sent += LOAD // 10
            self.stopping.wait(max(0.0, 0.1 - (time.monotonic() - began)))
        producer.close()

    def stop(self) -> int:
        self.stopping.set()
        self.join(30)
        return self.sent


class Cluster:
    """The stack on hosts, with a supervisor that restarts a process that exited (as a container
    runtime would), so every scenario shows whether the pipeline comes back by itself."""

    def __init__(self, workdir: Path, hosts: Hosts, skew: dict[str, str] | None = None, **env: str) -> None:
        """`skew`: host -> a faketime offset ("+600s") its processes' clocks are off by."""
        self.hosts = hosts
        self.skew = skew or {}
        self.stack = LocalStack(workdir, {**FAST, **env}, address=hosts.gateway)
        self.starters: dict[str, Callable[[], Service]] = {}
        self.restarts: list[str] = []
        self.stopping = threading.Event()
        self.r: redis.Redis | None = None

    def start(self) -> None:
        s, h = self.stack, self.hosts
        s.start_services(4)
        self.r = redis.Redis.from_url(s.redis_url)

        io, cpu1, cpu2, bridge = (h[name].placement(self.skew.get(name)) for name in ("io", "cpu1", "cpu2", "bridge"))
        self.starters = {
            "io": lambda: s.start_io_worker(name="io", env=io.env, wrap=io.wrap),
            "beat": lambda: s.start_beat(name="beat", env=io.env, wrap=io.wrap),
            "cpu1": lambda: s.start_cpu_worker(name="cpu1", env=cpu1.env, wrap=cpu1.wrap),
            "cpu2": lambda: s.start_cpu_worker(name="cpu2", env=cpu2.env, wrap=cpu2.wrap),
            "bridge": lambda: s.start_bridge(name="bridge", env=bridge.env, wrap=bridge.wrap),
        }
        for start in self.starters.values():
            start()
        threading.Thread(target=self._supervise, daemon=True).start()

    def _supervise(self) -> None:
        while not self.stopping.wait(1.0):
            for service in list(self.stack.services):
                if service.name in self.starters and not service.alive():
                    self.stack.services.remove(service)
                    self.restarts.append(service.name)
                    self.starters[service.name]()

    def forget(self, name: str) -> None:
        """A host lost for good: its process is not restarted."""
        self.starters.pop(name, None)

    def close(self) -> None:
        self.stopping.set()
        self.stack.close()


@pytest.fixture
def cluster_factory(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[tuple[Cluster, Hosts]] = []

    def make(**options: object) -> Cluster:
        if reason := why_not(("faketime",) if options.get("skew") else ()):
            pytest.skip(reason)
        hosts = Hosts(tmp_path, ["bridge", "io", "cpu1", "cpu2"])
        cluster = Cluster(tmp_path / "stack", hosts, **options)  # type: ignore[arg-type]
        made.append((cluster, hosts))
        cluster.start()
        return cluster

    yield make
    for cluster, hosts in made:
        try:
            cluster.close()
        finally:
            hosts.close()  # every namespace, rule and mount, whatever the stack's end


@pytest.fixture
def cluster(cluster_factory: Callable[..., Cluster]) -> Cluster:
    return cluster_factory()


def finish(cluster: Cluster, load: SteadyLoad) -> None:
    """Stop the load, then every record archived once, at most N objects per app-hour, nothing
    left in the spool or in Redis, and no process restarted."""
    sent = load.stop()
    r, stack = cluster.r, cluster.stack
    assert r is not None
    wait_until(lambda: settled(r, sent), 300, f"{sent} records archived", interval=0.25)
    per_app_hour = assert_exactly_once(stack.workdir / "archive", set(range(sent)))
    objects: dict[Path, int] = {}
    for obj in (stack.workdir / "archive").rglob("*.jsonl.zst"):
        objects[obj.parent] = objects.get(obj.parent, 0) + 1
    assert per_app_hour and max(objects.values()) <= 10
    left = [p for p in cluster.hosts.shared_spool.rglob("*") if p.is_file() and "schedule" not in p.name]
    assert not left, f"left in the spool: {left[:5]}"
    keys = {k.decode() for k in r.scan_iter(f"{schema.PREFIX}*")}
    # A worker cut off while it held tasks leaves their queued-task notes, which expire (their
    # messages wait out the broker's visibility timeout; the work itself was redriven).
    notes = {k for k in keys if k.endswith(":queued") and 0 < r.ttl(k) <= schema.QUEUED_TTL_SECONDS}
    assert not {k for k in keys - notes if k.startswith((f"{schema.PREFIX}b:", schema.SLOT_STATE_PREFIX))}, keys
    assert r.zcard(schema.INFLIGHT) == 0 and r.hlen(schema.SEALED) == 0 and r.scard(schema.SLOTS) == 0
    assert not r.exists(schema.UPLOAD_PLAN, schema.SEALED_RECORDS, schema.TAIL_PLAN, schema.BATCH_BYTES)
    assert int(r.get(schema.INFLIGHT_BYTES) or 0) == 0
    # Every process rode the fault out: none exited for the supervisor to restart
    # (docs/operating.md, "Several hosts").
    assert not cluster.restarts, f"processes exited and were restarted: {cluster.restarts}"


def under_load(cluster: Cluster, progress: Callable[[redis.Redis], int] = compressed,
               ) -> tuple[redis.Redis, SteadyLoad]:
    """Start the steady load and wait until the pipeline is working through it."""
    r = cluster.r
    assert r is not None
    load = SteadyLoad(cluster.stack)
    load.start()
    wait_until(lambda: progress(r) > LOAD * 3, 120, "the pipeline under load")
    return r, load


class Logs:
    """Where each worker's and Beat's log ends now, to see what they do from here on."""

    WORK = {"io": "] succeeded in", "cpu1": "] succeeded in", "cpu2": "] succeeded in",
            "beat": "Sending due task"}

    def __init__(self, cluster: Cluster) -> None:
        self.stack = cluster.stack
        self.ends = {name: self.stack.service(name).log.stat().st_size for name in self.WORK}

    def since(self, name: str) -> str:
        with open(self.stack.service(name).log, "rb") as log:
            log.seek(self.ends[name])
            return log.read().decode(errors="replace")

    def each_works_again(self, within: float = 60) -> None:
        """Every worker finishes a task, and Beat sends one, after this mark (the bridge shows it
        works by the backlog it hands over): none is alive but stuck after a heal."""
        for name, sign in self.WORK.items():
            wait_until(lambda name=name, sign=sign: sign in self.since(name), within,
                       f"{name} to work again after the heal")


def caught_up(cluster: Cluster, load: SteadyLoad, within: float, what: str) -> float:
    """Seconds until everything sent so far is compressed; fails beyond `within`."""
    r = cluster.r
    assert r is not None
    target, began = load.sent, time.monotonic()
    wait_until(lambda: compressed(r) >= target, within, what, interval=0.2)
    return time.monotonic() - began


def test_a_cpu_host_cut_off_from_redis_past_its_lease(cluster_factory: Callable[..., Cluster]):
    cluster = cluster_factory(**TIMEOUTS)
    r, load = under_load(cluster)
    before = rate(lambda: compressed(r), 10)
    redis_port = cluster.stack.redis_port
    assert cluster.hosts.connections("cpu1", redis_port) > 0
    cluster.hosts.partition("cpu1", redis_port)
    try:
        began, at_cut = time.monotonic(), compressed(r)
        # Keepalive finds an idle connection dead after its idle time and unanswered probes (11 s),
        # TCP_USER_TIMEOUT one with a request unanswered: every process notices, none hangs on it.
        k = KEEPALIVE_OPTIONS
        found_dead = k[socket.TCP_KEEPIDLE] + k[socket.TCP_KEEPINTVL] * k[socket.TCP_KEEPCNT] + 3
        wait_until(lambda: cluster.hosts.connections("cpu1", redis_port) == 0, found_dead,
                   "the cut-off host to find every Redis connection dead", interval=0.2)
        dead_after = time.monotonic() - began
        time.sleep(max(0.0, began + LEASE + 4 - time.monotonic()))  # past the slot lease
        during = (compressed(r) - at_cut) / (time.monotonic() - began)
    finally:
        cluster.hosts.heal("cpu1")
    logs = Logs(cluster)
    took = caught_up(cluster, load, 30, "the backlog to clear after the heal")
    print(f"\ncpu host cut off: {before:.0f} records/s before, {during:.0f} during, backlog cleared "
          f"{took:.1f} s after the heal; every Redis connection of the cut-off host found dead {dead_after:.1f} s "
          f"after the cut; restarts: {cluster.restarts}")
    assert during >= 0.5 * before, "the other cpu host kept compressing at half the rate or more"
    logs.each_works_again()
    finish(cluster, load)
    # The reachable host's tasks never waited on the cut-off host's slots: none ran into its time
    # limit or found every slot busy (the cut-off host's own tasks are redriven, as they must be).
    reachable = cluster.stack.service("cpu2").log.read_text()
    assert "SoftTimeLimitExceeded" not in reachable and "SlotsBusy" not in reachable


def test_a_cpu_host_cut_off_while_it_holds_slot_locks_mid_task(cluster_factory: Callable[..., Cluster]):
    """The cut comes while the host's compress task holds slot leases and a slot file's lock,
    between its appends and its commit, for longer than the lease and the task's time limit: the
    task ends by its Redis timeouts or its soft limit (no hard-limit kill of the pool child, which
    once made the worker's main process die on the heal), nothing is lost or doubled, and no
    process exits."""
    cluster = cluster_factory(**TIMEOUTS)
    r, load = under_load(cluster)
    cpu1 = cluster.stack.service("cpu1")
    redis_port = cluster.stack.redis_port
    # A compress task holds its slots' leases from before it takes a slot file's kernel lock until
    # the commit, just before it lets go of the file: holding the file, it holds the leases. Taken
    # through the host's spool view, the lock is held by that view's bindfs, for cpu1 alone.
    view = cluster.hosts["cpu1"].bindfs
    assert view is not None
    wait_until(lambda: bool(flocks_of(group_pids(cpu1.proc.pid) | {view.pid})), 60,
               "cpu1 mid-append, holding a slot file's lock", interval=0.001)
    cluster.hosts.partition("cpu1", redis_port)
    try:
        time.sleep(LEASE + 10)  # past the lease and the compress time limit
    finally:
        cluster.hosts.heal("cpu1")
    logs = Logs(cluster)
    took = caught_up(cluster, load, 30, "the backlog to clear after the heal")
    print(f"\ncpu host cut off mid-append for {LEASE + 10} s: backlog cleared {took:.1f} s after the heal; "
          f"restarts: {cluster.restarts}")
    logs.each_works_again()
    finish(cluster, load)
    # The soft limit may end a task held up by the cut (it raises in the task); the hard one, a
    # SIGKILL of the pool process, must not be needed.
    assert "Hard time limit" not in cpu1.log.read_text(), "a hard time limit killed a pool child"


def test_a_cpu_host_whose_spool_mount_hangs_past_its_lease(cluster_factory: Callable[..., Cluster]):
    cluster = cluster_factory(**TIMEOUTS)
    r, load = under_load(cluster)
    before = rate(lambda: compressed(r), 10)
    cluster.hosts.hang_spool("cpu1")
    try:
        during = rate(lambda: compressed(r), LEASE + 4)
    finally:
        cluster.hosts.resume_spool("cpu1")
    logs = Logs(cluster)
    took = caught_up(cluster, load, 30, "the backlog to clear after the mount is back")
    print(f"\ncpu host's spool hung: {before:.0f} records/s before, {during:.0f} during, backlog cleared "
          f"{took:.1f} s after; restarts: {cluster.restarts}")
    assert during >= 0.5 * before
    logs.each_works_again()
    finish(cluster, load)


def test_a_cpu_host_lost_for_good(cluster_factory: Callable[..., Cluster]):
    cluster = cluster_factory(**TIMEOUTS)
    r, load = under_load(cluster)
    cluster.forget("cpu1")
    cluster.hosts.kill_processes("cpu1")
    took = caught_up(cluster, load, 60, "the other host to take over")
    print(f"\ncpu host lost: the other caught up in {took:.1f} s")
    finish(cluster, load)


def test_the_bridge_host_cut_off_from_kafka_then_from_redis(cluster: Cluster):
    r, load = under_load(cluster, handed_over)
    for port, what in ((cluster.stack.kafka_port, "Kafka"), (cluster.stack.redis_port, "Redis")):
        cluster.hosts.partition("bridge", port)
        try:
            time.sleep(14)  # the fault itself: past the Kafka session timeout and the Redis keepalive
        finally:
            cluster.hosts.heal("bridge")
        logs = Logs(cluster)
        took = caught_up(cluster, load, 30, f"the backlog to clear after the bridge's {what} heals")
        print(f"\nbridge cut off from {what} for 14 s: backlog cleared {took:.1f} s after the heal; "
              f"restarts: {cluster.restarts}")
        logs.each_works_again()
    finish(cluster, load)


def test_packet_loss_between_every_worker_host_and_redis(cluster: Cluster):
    r, load = under_load(cluster)
    workers = ("io", "cpu1", "cpu2")
    for name in workers:
        cluster.hosts.lose(name, cluster.stack.redis_port, 0.3)
    try:
        during = rate(lambda: compressed(r), 60)  # a minute of 30 % loss
    finally:
        for name in workers:
            cluster.hosts.heal(name)
    logs = Logs(cluster)
    took = caught_up(cluster, load, 30, "the backlog to clear after the loss ends")
    print(f"\n30 % loss to Redis: {during:.0f} records/s during the minute (load {LOAD}/s), backlog cleared "
          f"{took:.1f} s after; restarts: {cluster.restarts}")
    logs.each_works_again()
    finish(cluster, load)


def test_a_partition_that_outlasts_every_timeout(cluster_factory: Callable[..., Cluster]):
    """Longer than the slot lease, the compress time limit, the redrive age (TIMEOUTS) and the
    time keepalive takes to find a connection dead."""
    cluster = cluster_factory(**TIMEOUTS)
    r, load = under_load(cluster)
    cluster.hosts.partition("cpu1", cluster.stack.redis_port)
    try:
        time.sleep(2 * LEASE)  # the fault itself
    finally:
        cluster.hosts.heal("cpu1")
    logs = Logs(cluster)
    took = caught_up(cluster, load, 30, "the backlog to clear after the heal")
    print(f"\ncpu host cut off for {2 * LEASE} s: backlog cleared {took:.1f} s after; restarts: {cluster.restarts}")
    logs.each_works_again()
    finish(cluster, load)


# The time at the start of each line a worker logs, by the worker's own clock (local time).
LOG_STAMP = re.compile(rb"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}): ", re.M)


def clock_offset(log: Path) -> float:
    """Seconds the clock of the process writing `log` is ahead of this machine's: the time it
    gives a line it logs now (the first after this call), minus this machine's time then."""
    start = log.stat().st_size
    wait_until(lambda: LOG_STAMP.search(log.read_bytes()[start:]) is not None, 30, f"a new line in {log.name}")
    now = time.time()
    stamp = LOG_STAMP.search(log.read_bytes()[start:])
    assert stamp is not None
    when = time.mktime(time.strptime(stamp[1].decode(), "%Y-%m-%d %H:%M:%S")) + int(stamp[2]) / 1000
    return when - now


def test_worker_hosts_whose_clocks_are_ten_minutes_off(cluster_factory: Callable[..., Cluster]):
    """cpu1's clock runs ten minutes ahead, cpu2's ten minutes behind: no slot file of the running hour
    is sealed before its open-hour seal age (a writer behind would make it look idle), every one is
    sealed once that age has passed (a writer ahead would make it look busy for ten minutes), and
    every record lands in the hour of its event time."""
    cluster = cluster_factory(skew={"cpu1": "+600s", "cpu2": "-600s"}, SLUICE_SEAL_OPEN_HOUR_AGE_SECONDS="10")
    r, load = under_load(cluster)  # event times within the last minute: the running hour, mostly
    for name, off_by in (("cpu1", 600), ("cpu2", -600), ("io", 0)):  # io: this machine's clock
        seen = clock_offset(cluster.stack.service(name).log)
        print(f"{name}'s clock: {seen:+.1f} s")
        assert abs(seen - off_by) < 30, f"{name}'s clock is {seen:+.0f} s off, not {off_by:+d} s: no skew took effect"
    running = time.strftime("%Y%m%d%H", time.gmtime())
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:  # appended to every second: never idle for 10 s
        sealed = [e.decode() for e in r.hkeys(schema.SEALED)]
        assert not [e for e in sealed if schema.parse_sealed_entry(e)[1] == running], sealed
        time.sleep(0.5)
    finish(cluster, load)  # the running hour's files sealed 10 s after the last append, not 10 min
