"""Upgrading without fear: a task of a protocol version a worker does not read is left for one
that does; a Redis schema of another major version stops old processes at start-up; every
process replaced in turn under load, by one of this code or of this release replacing the
previous one (its real code), and two Beats at once, lose and double nothing; the probes' files
say what the processes are doing."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import oss2
import pytest
import redis
from celery import Celery

from devstack import releases, sample
from devstack.local import PROJECT_ROOT, LocalStack, start_pipeline, wait_until
from sluice.core import schema
from sluice.core.protocol import SCHEMA_MAJOR, TASK_HEADER
from sluice.ops import queues
from tests.integration.conftest import Traffic, assert_exactly_once, wait_archived
from tests.integration.test_oss_pipeline import PREFIX, download
from tests.oss_server import OssServer

pytestmark = pytest.mark.integration


def test_a_task_of_a_future_protocol_is_neither_run_nor_lost(stack_factory):
    stack = stack_factory()
    r = redis.Redis.from_url(stack.redis_url)
    io_log = stack.service("io").log
    wait_until(lambda: "ready." in io_log.read_text(), 60, "the io worker")
    future, legacy = uuid.uuid4().hex, uuid.uuid4().hex
    sender = Celery("a-newer-sluice", broker=stack.redis_url)
    try:
        sender.send_task("sluice.split", args=["logs:0:0-0@77"], task_id=future, queue="io",
                         headers={TASK_HEADER: 999})
        sender.send_task("sluice.split", args=["logs:0:1-1@77"], task_id=legacy, queue="io")  # sent before versions
    finally:
        sender.close()

    def held() -> bool:
        return future in queues.waiting_task_ids(r, ("io",)) or any(
            future in raw.decode() for raw in r.hvals(queues.unacked_key("io")))

    wait_until(lambda: f"{legacy}] succeeded" in io_log.read_text(), 60, "the task with no version to run")
    wait_until(lambda: "has protocol version 999" in io_log.read_text(), 60, "the worker to meet it")
    # Several deliveries of the same message to the same worker. Between kombu's BRPOP and its
    # write to the unacked hash a delivered message is briefly in neither place, so a sample that
    # misses it only fails if the message does not come back.
    deadline = time.monotonic() + 8
    while time.monotonic() < deadline:
        wait_until(held, 5, "the future task back in the queue or held by a worker")
        time.sleep(0.5)
    text = io_log.read_text()
    assert text.count(f"sluice.split[{future}] has protocol version 999") == 1, "logged once"
    assert f"{future}] succeeded" not in text and f"{future}] raised" not in text


def start_alone(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), env={**os.environ, **env}, capture_output=True, text=True, timeout=90,
                          cwd=PROJECT_ROOT)


def test_a_newer_schema_in_redis_stops_an_older_process_at_start_up(redis_only: LocalStack, tmp_path: Path):
    r = redis.Redis.from_url(redis_only.redis_url)
    r.set(schema.SCHEMA_VERSION, f"{SCHEMA_MAJOR + 1}.0")
    env = {"SLUICE_REDIS_URL": redis_only.redis_url, "SLUICE_SPOOL_DIR": str(tmp_path / "spool"),
           "SLUICE_METRICS_PORT": "0"}
    bridge = start_alone(env, sys.executable, "-m", "bridge")
    worker = start_alone(env, sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "cpu", "-P", "solo")
    beat = start_alone(env, sys.executable, "-m", "celery", "-A", "tasks", "beat", "-s", str(tmp_path / "schedule"))
    for name, result in (("bridge", bridge), ("worker", worker), ("beat", beat)):
        lines = [line for line in result.stderr.splitlines() if f"schema {SCHEMA_MAJOR + 1}.0" in line]
        assert result.returncode == 2, (name, result.stderr[-2000:])
        assert len(lines) == 1 and "upgrade this process" in lines[0], (name, result.stderr[-2000:])
    assert r.get(schema.SCHEMA_VERSION) == f"{SCHEMA_MAJOR + 1}.0".encode(), "left as it was"


def test_a_process_started_while_redis_is_down_checks_the_schema_once_it_is_back(tmp_path: Path):
    """Started during a Redis outage, the bridge, a worker and Beat wait; when Redis comes back
    holding a newer schema major, each stops with one line and status 2, as at start-up."""
    stack = LocalStack(tmp_path / "stack")
    try:
        stack.start_redis()
        redis.Redis.from_url(stack.redis_url).set(schema.SCHEMA_VERSION, f"{SCHEMA_MAJOR + 1}.0")
        [server] = stack.services
        server.stop()  # SIGTERM: its AOF keeps the newer version for the restart
        stack.services.remove(server)
        env = {**os.environ, "SLUICE_REDIS_URL": stack.redis_url, "SLUICE_SPOOL_DIR": str(tmp_path / "spool"),
               "SLUICE_METRICS_PORT": "0"}
        processes = {name: subprocess.Popen(argv, env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                                            stderr=open(tmp_path / f"{name}.err", "w"))
                     for name, argv in (
                         ("bridge", [sys.executable, "-m", "bridge"]),
                         ("worker", [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "cpu", "-P",
                                     "solo"]),
                         ("beat", [sys.executable, "-m", "celery", "-A", "tasks", "beat", "-s",
                                   str(tmp_path / "schedule")]))}
        try:
            for name in processes:
                err = tmp_path / f"{name}.err"
                wait_until(lambda err=err: "checked once it does" in err.read_text(), 60,
                           f"the {name} to start without Redis")
            stack.start_redis()  # the same port and data
            for name, proc in processes.items():
                assert proc.wait(60) == 2, (name, (tmp_path / f"{name}.err").read_text()[-2000:])
                lines = [line for line in (tmp_path / f"{name}.err").read_text().splitlines()
                         if f"schema {SCHEMA_MAJOR + 1}.0" in line]
                assert len(lines) == 1 and "upgrade this process" in lines[0], (name, lines)
        finally:
            for proc in processes.values():
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        stack.close()


def replace_in_turn(stack: LocalStack, r: redis.Redis, records: int, order: tuple[str, ...]) -> None:
    """Replace the stack's processes one by one, in `order`, with this release's, each once a
    further sixth of `records` is compressed: the new one started, then the old one sent SIGTERM
    (a worker finishes what it runs, the bridge hands over and commits), as a rolling update does."""
    from devstack.progress import compressed

    start = {"io": lambda: stack.start_io_worker(name="io-new"), "cpu0": lambda: stack.start_cpu_worker(name="cpu-new"),
             "beat": lambda: stack.start_beat(name="beat-new"), "bridge": lambda: stack.start_bridge(name="bridge-new")}
    for step, name in enumerate(order, 1):
        wait_until(lambda step=step: compressed(r) >= records * step / 6, 180, f"load before step {step}")
        start[name]()
        stack.service(name).stop()
        stack.services.remove(stack.service(name))


def test_every_process_replaced_in_turn_under_load_loses_and_doubles_nothing(stack_factory):
    stack = stack_factory()
    values = [v for _, v in sample.lines(60_000, sample.app_names(12), time.time() - 3600, 3600, seed=41)]
    r = redis.Redis.from_url(stack.redis_url)
    traffic = Traffic(stack, lines=values)
    replace_in_turn(stack, r, len(values), ("io", "cpu0", "beat", "bridge"))
    traffic.finish()
    wait_archived(stack, len(values))
    assert_exactly_once(stack.workdir / "archive", traffic.seqs)


def test_the_previous_release_replaced_in_turn_by_this_one_loses_and_doubles_nothing(tmp_path: Path):
    """The real upgrade: the previous release (devstack.releases.PREVIOUS_RELEASE, its own tree
    and virtualenv) runs the pipeline under load, and its processes are replaced one by one with
    this release's, each direction of task crossing the versions: the new io worker splits the old
    bridge's batches and sends the old cpu worker its compress tasks, the old Beat's sweeps run on
    the new io worker. Every record once, nothing left in flight or queued, and no worker met a
    task it could not read or run."""
    old = releases.install(releases.PREVIOUS_RELEASE, tmp_path / "previous")
    stack = start_pipeline(tmp_path / "stack", release=old)
    try:
        r = redis.Redis.from_url(stack.redis_url)
        for service in stack.services:
            if service.name not in ("redis", "tansu"):  # each runs the old tree's interpreter, in that tree
                proc = Path(f"/proc/{service.proc.pid}")
                wait_until(lambda proc=proc: (proc / "cmdline").read_bytes() != b"", 10, f"{service.name} to start")
                assert (proc / "cmdline").read_bytes().split(b"\0")[0].decode() == old.python, service.name
                assert (proc / "cwd").resolve() == old.root.resolve(), service.name
        values = [v for _, v in sample.lines(40_000, sample.app_names(12), time.time() - 3600, 3600, seed=43)]
        traffic = Traffic(stack, lines=values, per_second=2_000)  # about 20 s: every step under load
        replace_in_turn(stack, r, len(values), ("io", "bridge", "cpu0", "beat"))
        traffic.finish()
        wait_archived(stack, len(values))
        assert_exactly_once(stack.workdir / "archive", traffic.seqs)
        assert r.zcard(schema.INFLIGHT) == 0 and not r.hlen(schema.SEALED)
        assert not queues.waiting_task_ids(r, ("io", "cpu"))
        for log in (stack.workdir / "logs").glob("*.log"):
            text = log.read_text(errors="replace")
            for sign in ("has protocol version", "unregistered task", "Traceback", "] raised"):
                assert sign not in text, (log.name, sign, text[text.index(sign) - 2000:][:4000])
        for worker, task in (("io", "split"), ("io-new", "split"), ("cpu0", "compress"), ("cpu-new", "compress")):
            log = (stack.workdir / "logs" / f"{worker}.log").read_text()
            assert re.search(rf"sluice\.{task}\[\w+\] succeeded", log), f"{worker} ran no {task}: no load crossed"
    finally:
        stack.close()


def test_two_beats_at_once_upload_nothing_twice(stack_factory, tmp_path: Path):
    """Archived to the OSS test server, whose log of object writes shows each object written
    once: a repeated upload of a file goes to the same key, so the archive alone cannot show it."""
    with OssServer() as server:
        bucket = f"sluice-{uuid.uuid4().hex[:12]}"
        server.create_bucket(bucket)
        stack = stack_factory(SLUICE_STORE_URL=f"oss://{bucket}/{PREFIX}", SLUICE_OSS_ENDPOINT=server.endpoint,
                              SLUICE_OSS_ACCESS_KEY_ID=server.access_key_id,
                              SLUICE_OSS_ACCESS_KEY_SECRET=server.access_key_secret)
        stack.start_beat(name="beat2")  # a Deployment scaled to 2 by mistake
        traffic = Traffic(stack, records=30_000)
        traffic.finish()
        wait_archived(stack, 30_000)
        archive = tmp_path / "archive"
        assert download(server, bucket, archive) > 0
        writes = Counter(server.writes)
        stored = {f"/{bucket}/{obj.key}" for obj in oss2.ObjectIterator(server.bucket(bucket), prefix=PREFIX + "/")}
    per_app_hour = assert_exactly_once(archive, traffic.seqs)
    assert per_app_hour
    objects = list(archive.rglob("*.jsonl.zst"))
    per_dir: dict[Path, int] = {}
    for obj in objects:
        per_dir[obj.parent] = per_dir.get(obj.parent, 0) + 1
    assert max(per_dir.values()) <= 10
    twice = {key: n for key, n in writes.items() if n > 1}
    assert not twice, f"{len(twice)} objects uploaded more than once, e.g. {list(twice.items())[:3]}"
    assert stored <= set(writes), "every object in the store was written through the server"
    for name in ("beat", "beat2"):
        assert "Sending due task seal-and-upload" in stack.service(name).log.read_text(), name


def test_the_probe_files_follow_a_worker_and_the_bridge(stack_factory, tmp_path: Path):
    stack = stack_factory()
    worker_dir, bridge_dir = tmp_path / "cpu-health", tmp_path / "bridge-health"
    worker = stack.start_cpu_worker(name="cpu-probed", env={"SLUICE_HEALTH_DIR": str(worker_dir)})
    bridge = stack.start_bridge(name="bridge-probed", env={"SLUICE_HEALTH_DIR": str(bridge_dir)})
    wait_until(lambda: (worker_dir / "ready").exists() and (worker_dir / "alive").exists(), 60,
               "the worker to say it is alive and ready")
    first = (worker_dir / "alive").stat().st_mtime
    wait_until(lambda: (worker_dir / "alive").stat().st_mtime > first, 30, "the worker's heartbeat")
    sample.produce(stack.bootstrap, "logs", [b'{"app": "probe", "ts": 1}'] * 10)
    wait_until(lambda: (bridge_dir / "alive").exists() and (bridge_dir / "ready").exists(), 60,
               "the bridge to hold its partitions")
    beat = (bridge_dir / "alive").stat().st_mtime
    wait_until(lambda: (bridge_dir / "alive").stat().st_mtime > beat, 30, "the bridge's heartbeat")
    worker.stop()
    assert not (worker_dir / "ready").exists(), "a worker shutting down is not ready"
    stack.services.remove(worker)
    bridge.stop()  # SIGTERM: it hands over what it holds, commits and leaves the group
    assert bridge.proc.returncode == 0, bridge.log.read_text()[-2000:]
    assert not (bridge_dir / "ready").exists(), "a bridge shutting down is not ready"
    assert (bridge_dir / "alive").exists()
    stack.services.remove(bridge)
