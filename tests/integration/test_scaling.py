"""Scaling by what a queue has to do, as KEDA does with deploy/keda.yaml: a controller loop per
queue reads the same figures as that queue's ScaledObject (sluice.ops.queues: tasks waiting in the
list plus tasks the workers hold in their unacked hash), with the ScaledObject's own target,
starts and SIGTERMs workers accordingly, and nothing is lost or doubled: from zero io and cpu
workers, under load, through a drain of every cpu worker mid-task, and back to zero."""

from __future__ import annotations

import contextlib
import json
import math
import re
import signal
import threading
import time
import urllib.request
from typing import Callable, Iterator, NamedTuple

import pytest
import redis
import yaml
from celery.beat import ScheduleEntry

from beat_schedule import WORK, WorkGatedScheduler
from devstack import sample
from devstack.local import PROJECT_ROOT, LocalStack, Service, free_port, wait_until
from devstack.progress import compressed
from sluice.core import schema
from sluice.core.redis_client import get_redis
from sluice.core.settings import get_settings
from sluice.ops import queues
from tests.integration.conftest import Traffic, assert_exactly_once, paced, wait_archived

pytestmark = pytest.mark.integration

MAX_WORKERS = 3
# KEDA's cooldownPeriod (300 s in deploy/keda.yaml), shortened: only its role matters here.
COOLDOWN_SECONDS = 4.0


def keda_target(queue: str) -> int:
    """The ScaledObject's target for `queue`'s workers: replicas = ceil((waiting + unacked) / target)."""
    docs = yaml.safe_load_all((PROJECT_ROOT / "deploy" / "keda.yaml").read_text())
    [scaled] = [d for d in docs if d["kind"] == "ScaledObject" and d["metadata"]["name"] == f"{queue}-worker"]
    return int(scaled["spec"]["advanced"]["scalingModifiers"]["target"])


# A worker's log: a task it took, and one it is done with (run, or discarded as expired).
TASK_RECEIVED = re.compile(r"Task [\w.]+\[([\w-]+)\] received")
TASK_DONE = re.compile(r"Task [\w.]+\[([\w-]+)\] (?:succeeded|raised|failed|retry|rejected|ignored)"
                       r"|Discarding revoked task: [\w.]+\[([\w-]+)\]")


class Exposed(NamedTuple):
    """What sluice exposes of one queue at the moment a worker is told to stop: the figures KEDA
    reads (the bridge's /metrics: the list's length, the tasks held), the queue's list and every
    kombu unacked hash as Redis holds them, and what the stopping worker's log says it runs."""

    metrics: dict[str, float]  # sluice_queue_waiting_tasks, sluice_queue_unacked_tasks of the queue
    waiting: list[str]  # ids of the queue's messages in its lists
    held: list[str]  # ids of the queue's messages in any unacked hash
    running: list[str]  # ids of tasks the stopping worker received and has not finished

    def empty(self) -> bool:
        return not any(self.metrics.values()) and not self.waiting and not self.held and not self.running


def message_id(raw: bytes) -> str:
    return str(json.loads(raw)["headers"]["id"])


PAUSING = threading.Lock()  # one pause at a time: one controller's unpause would end another's


@contextlib.contextmanager
def writes_paused(r: redis.Redis) -> Iterator[None]:
    """No client's write reaches Redis while the block runs (CLIENT PAUSE WRITE, lifted at its end
    or after 5 s): no task is sent, taken (BRPOP is a write) or acknowledged meanwhile."""
    with PAUSING:
        r.client_pause(5000, all=False)
        try:
            yield
        finally:
            r.client_unpause()


class Controller(threading.Thread):
    """KEDA and the HPA for one queue's workers, in miniature: desired = ceil(figure / target), at
    most MAX_WORKERS, and to zero only once the figure has been 0 for the cooldown."""

    def __init__(self, stack: LocalStack, queue: str, start: Callable[[str], Service]) -> None:
        super().__init__(daemon=True)
        self.queue, self.start_worker, self.target = queue, start, keda_target(queue)
        self.stack = stack
        self.r = redis.Redis.from_url(stack.redis_url)
        self.lock = threading.Lock()  # the loop and a test's drain both change the workers
        self.workers: list[Service] = []
        self.events: list[tuple[str, int]] = []  # (what, figure)
        self.at_stops: list[Exposed] = []  # what sluice exposed at each "stop", before the SIGTERM
        self.started = 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def figure(self) -> int:
        return queues.waiting(self.r, self.queue) + queues.unacked(self.r, self.queue)

    def exposed(self, worker: Service) -> Exposed:
        """Everything sluice shows of the queue, read independently of `figure`."""
        port = self.stack.metrics_ports["bridge"]
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
        metrics = {name: float(value) for name, value in re.findall(
            rf'^(sluice_queue_(?:waiting|unacked)_tasks){{queue="{self.queue}"}} (\S+)$', text, re.M)}
        assert len(metrics) == 2, "the bridge exports both figures KEDA reads"
        lists = [k for k in self.r.scan_iter(match=f"{self.queue}*") if self.r.type(k) == b"list"]
        hashes = [k for k in self.r.scan_iter(match="unacked*") if self.r.type(k) == b"hash"]
        waiting = [message_id(raw) for key in lists for raw in self.r.lrange(key, 0, -1)]
        # kombu keeps a taken message as [message, exchange, routing key] under its delivery tag.
        held = [str(json.loads(raw)[0]["headers"]["id"]) for key in hashes for raw in self.r.hvals(key)
                if json.loads(raw)[2] == self.queue]
        log = worker.log.read_text(errors="replace")
        done = {ran or discarded for ran, discarded in TASK_DONE.findall(log)}
        running = sorted(set(TASK_RECEIVED.findall(log)) - done)
        return Exposed(metrics, waiting, held, running)

    def run(self) -> None:
        idle_since: float | None = None
        try:
            while not self.stop_event.wait(0.5):
                with self.lock:
                    figure = self.figure()
                    desired = min(MAX_WORKERS, math.ceil(figure / self.target))
                    if figure == 0:
                        idle_since = idle_since or time.monotonic()
                        if time.monotonic() - idle_since < COOLDOWN_SECONDS:
                            desired = len(self.workers)
                    else:
                        idle_since = None
                        desired = max(desired, len(self.workers))
                    while len(self.workers) < desired:
                        self.started += 1
                        self.workers.append(self.start_worker(f"{self.queue}-k{self.started}"))
                        self.events.append(("start", figure))
                    while len(self.workers) > desired:
                        worker = self.workers[-1]
                        # The figure the stop is decided on, and what sluice exposes, read while
                        # nothing in Redis changes: a task sent or taken in between would
                        # otherwise show in one and not the other.
                        with writes_paused(self.r):
                            figure = self.figure()
                            exposed = self.exposed(worker) if figure == 0 else None
                        if exposed is None:
                            idle_since = None
                            break
                        self.at_stops.append(exposed)
                        self._sigterm([worker], "stop", figure)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def drain(self) -> list[Service]:
        """SIGTERM every worker at once, as a node drain or a rollout does (the controller itself
        never scales in while the figure is above 0); the workers stopped."""
        with self.lock:
            drained = list(self.workers)
            self._sigterm(drained, "drain", self.figure())
            return drained

    def _sigterm(self, workers: list[Service], what: str, figure: int) -> None:
        """SIGTERM, as the HPA's scale-in does: Celery's warm shutdown finishes the tasks it runs."""
        for worker in workers:
            self.workers.remove(worker)
            # Out of the stack's services first: the test's check_alive must not take a worker
            # told to stop for one that died (reap ends it either way).
            self.stack.services.remove(worker)
            worker.proc.send_signal(signal.SIGTERM)  # to celery alone, as Kubernetes signals PID 1
        for worker in workers:
            worker.reap(timeout=60)
            self.events.append((what, figure))


def running(worker: Service) -> bool:
    """The worker has received a compress task it has neither finished nor handed back (its log
    says so): a message received but not started goes back to the queue at a warm shutdown
    ("Restoring N unacknowledged message(s)"), for another worker to run."""
    text = worker.log.read_text(errors="replace")
    restored = sum(int(n) for n in re.findall(r"Restoring (\d+) unacknowledged message", text))
    return text.count("Task sluice.compress[") - restored > 2 * text.count("] succeeded in")


def test_scale_from_zero_to_zero_under_load_and_a_drain_mid_task_lose_nothing(stack_factory):
    stack = stack_factory(cpu_workers=0, io_worker=False, SLUICE_ZSTD_LEVEL="15")
    r = redis.Redis.from_url(stack.redis_url)
    values = [v for _, v in sample.lines(50_000, sample.app_names(12), time.time() - 3600, 3600, seed=51)]
    first, second = values[:40_000], values[40_000:]
    io = Controller(stack, "io", lambda name: stack.start_io_worker(name=name))
    cpu = Controller(stack, "cpu", lambda name: stack.start_cpu_worker(name=name))
    for controller in (io, cpu):
        controller.start()
    drained_now = threading.Event()
    try:
        # A burst arriving at zero workers of either kind, and going on for about twenty seconds.
        producer = threading.Thread(target=sample.produce,
                                    args=(stack.bootstrap, "logs", paced(first, 2_000, until=drained_now)))
        producer.start()
        wait_until(lambda: bool(io.events) and bool(cpu.events), 60, "the first workers to start from the figures")
        assert io.events[0] == ("start", io.events[0][1]) and io.events[0][1] > 0
        assert cpu.events[0] == ("start", cpu.events[0][1]) and cpu.events[0][1] > 0
        # Drain every cpu worker (scale to zero by hand) while one of them runs a task, under load.
        wait_until(lambda: any(running(w) for w in list(cpu.workers)), 120, "a cpu worker running a task")
        drained = cpu.drain()
        assert producer.is_alive(), "the drain came after the load ended: it tests less than it says"
        drained_now.set()
        producer.join()
        wait_archived(stack, len(first), timeout=400)
        finished_after_sigterm = 0
        for worker in drained:  # warm shutdown: each finished every task it had taken
            text = worker.log.read_text(errors="replace")
            assert "Warm shutdown" in text and not running(worker), worker.log
            finished_after_sigterm += text.split("Warm shutdown", 1)[1].count("] succeeded in")
        print(f"drained {len(drained)} cpu workers; {finished_after_sigterm} tasks finished after the SIGTERM")
        assert finished_after_sigterm > 0, "the drain came between tasks: it tests less than it says"
        # Nothing to do: no sweep is sent, so the io workers reach zero too, as do the cpu ones.
        wait_until(lambda: not io.workers and not cpu.workers, 90, "the io and cpu workers scaled to zero")
        assert not r.exists(*WORK["seal-and-upload"]), "scaled to zero with work in Redis"
        before = io.started, cpu.started
        Traffic(stack, lines=second).finish()  # a second burst, again at zero workers of either kind
        wait_until(lambda: compressed(r) >= len(values), 400, "the second burst compressed")
        assert io.started > before[0] and cpu.started > before[1], "workers were started from zero again"
        wait_archived(stack, len(values), timeout=400)
    finally:
        drained_now.set()
        for controller in (io, cpu):
            controller.stop_event.set()
            controller.join(60)
    assert io.error is None and cpu.error is None, (io.error, cpu.error)
    for controller in (io, cpu):
        stops = [figure for what, figure in controller.events if what == "stop"]
        assert stops and all(figure == 0 for figure in stops), "scaled in only with nothing waiting or running"
        # The controller stops a worker only at a figure of 0 (its own rule): what shows that
        # nothing waited or ran is what sluice exposed at each stop, read on its own.
        assert len(controller.at_stops) == len(stops)
        print(f"{controller.queue}: {len(stops)} workers stopped, each with nothing waiting or running")
        busy = [exposed for exposed in controller.at_stops if not exposed.empty()]
        assert not busy, f"{controller.queue}: scaled in with work waiting or running: {busy[:3]}"
    assert_exactly_once(stack.workdir / "archive", set(range(len(values))))
    objects: dict[str, int] = {}
    for obj in (stack.workdir / "archive").rglob("*.jsonl.zst"):
        objects[str(obj.parent)] = objects.get(str(obj.parent), 0) + 1
    assert max(objects.values()) <= 10


def _forget_settings() -> None:
    """The process's settings and Redis client are read once: read them again from the environment."""
    get_settings.cache_clear()
    get_redis.cache_clear()


def test_beat_sends_a_sweep_only_while_work_waits(redis_only: LocalStack, rds: redis.Redis, monkeypatch):
    """Beat's scheduler sends a due sweep only while Redis holds work for it (so an idle pipeline
    sends nothing to the io queue), and always if Redis does not answer."""
    from tasks.app import app

    scheduler = WorkGatedScheduler(app=app, lazy=True)
    sent: list[str] = []
    monkeypatch.setattr(scheduler, "apply_async", lambda entry, **_: sent.append(entry.name))
    entry = ScheduleEntry(name="seal-and-upload", task="sluice.upload", schedule=30, app=app)
    monkeypatch.setenv("SLUICE_REDIS_URL", redis_only.redis_url)
    _forget_settings()
    try:
        scheduler.apply_entry(entry)
        assert sent == [], "nothing to seal, upload or redrive"
        rds.sadd(schema.SLOTS, schema.slot_id("billing", "2026120307", 0))
        scheduler.apply_entry(entry)
        assert sent == ["seal-and-upload"]
        rds.delete(schema.SLOTS)
        rds.zadd(schema.INFLIGHT, {schema.batch_id("logs", 0, 0, 9): 1.0})
        scheduler.apply_entry(entry)
        scheduler.apply_entry(ScheduleEntry(name="redrive", task="sluice.redrive", schedule=30, app=app))
        assert sent == ["seal-and-upload", "seal-and-upload", "redrive"]
        monkeypatch.setenv("SLUICE_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
        _forget_settings()
        scheduler.apply_entry(entry)
        assert sent[-1] == "seal-and-upload" and len(sent) == 4, "sent when Redis does not answer"
    finally:
        _forget_settings()
