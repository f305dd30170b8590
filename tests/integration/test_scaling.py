"""Scaling by what a queue has to do, as KEDA does with deploy/keda.yaml: a controller loop reads
the same figures as the ScaledObject's triggers (sluice.queues: tasks waiting in the cpu list plus
tasks the cpu workers hold in their unacked hash), starts and SIGTERMs cpu workers accordingly,
and nothing is lost or doubled, from zero workers and back to zero."""

from __future__ import annotations

import math
import threading
import time

import pytest
import redis

from devstack import sample
from devstack.local import LocalStack, Service, wait_until
from devstack.progress import compressed
from sluice import queues
from tests.integration.conftest import Traffic, assert_exactly_once, wait_archived

pytestmark = pytest.mark.integration

TARGET = 2  # tasks per cpu worker (its concurrency), as the ScaledObject's target
MAX_WORKERS = 3
COOLDOWN_SECONDS = 4.0


class Controller(threading.Thread):
    """KEDA and the HPA for the cpu workers, in miniature: desired = ceil(figure / TARGET), at
    most MAX_WORKERS, and to zero only once the figure has been 0 for the cooldown."""

    def __init__(self, stack: LocalStack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.r = redis.Redis.from_url(stack.redis_url)
        self.workers: list[Service] = []
        self.events: list[tuple[str, int]] = []  # (what, figure)
        self.started = 0
        self.stop_event = threading.Event()
        self.error: BaseException | None = None

    def figure(self) -> int:
        return queues.waiting(self.r, "cpu") + queues.unacked(self.r, "cpu")

    def run(self) -> None:
        idle_since: float | None = None
        try:
            while not self.stop_event.wait(0.5):
                figure = self.figure()
                desired = min(MAX_WORKERS, math.ceil(figure / TARGET))
                if figure == 0:
                    idle_since = idle_since or time.monotonic()
                    if time.monotonic() - idle_since < COOLDOWN_SECONDS:
                        desired = len(self.workers)
                else:
                    idle_since = None
                    desired = max(desired, len(self.workers)) if desired else len(self.workers)
                while len(self.workers) < desired:
                    self.started += 1
                    self.workers.append(self.stack.start_cpu_worker(name=f"cpu-k{self.started}"))
                    self.events.append(("start", figure))
                while len(self.workers) > desired:
                    self.scale_in(self.workers[-1], figure)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc

    def scale_in(self, worker: Service, figure: int, what: str = "stop") -> None:
        """SIGTERM, as the HPA's scale-in does: Celery's warm shutdown finishes the task it runs."""
        self.workers.remove(worker)
        worker.stop(timeout=60)
        self.stack.services.remove(worker)
        self.events.append((what, figure))


def test_scale_from_zero_to_zero_and_a_sigterm_mid_task_lose_nothing(stack_factory):
    stack = stack_factory(cpu_workers=0, SLUICE_ZSTD_LEVEL="15")
    r = redis.Redis.from_url(stack.redis_url)
    values = [v for _, v in sample.lines(50_000, sample.app_names(12), time.time() - 3600, 3600, seed=51)]
    first, second = values[:40_000], values[40_000:]
    controller = Controller(stack)
    controller.start()
    try:
        Traffic(stack, lines=first).finish()  # a burst arriving at zero workers
        wait_until(lambda: bool(controller.events), 60, "the first worker to start from the queue's figure")
        assert controller.events[0][0] == "start" and controller.events[0][1] > 0
        wait_until(lambda: queues.unacked(r, "cpu") > 0 and bool(controller.workers), 60, "a cpu task running")
        # SIGTERM the last worker while one of its tasks runs (the controller itself never scales
        # in while the figure is above 0; a node drain or a rollout does).
        controller.scale_in(controller.workers[0], controller.figure(), what="forced stop")
        wait_archived(stack, len(first), timeout=400)
        wait_until(lambda: not controller.workers, 60, "the cpu workers to be scaled to zero")
        started_before = controller.started
        Traffic(stack, lines=second).finish()  # a second burst, again at zero workers
        wait_until(lambda: compressed(r) >= len(values), 400, "the second burst compressed")
        assert controller.started > started_before, "a worker was started from zero again"
        wait_archived(stack, len(values), timeout=400)
    finally:
        controller.stop_event.set()
        controller.join(60)
    assert controller.error is None, controller.error
    stops = [figure for what, figure in controller.events if what == "stop"]
    assert stops and all(figure == 0 for figure in stops), "scaled in only with nothing waiting or running"
    assert_exactly_once(stack.workdir / "archive", set(range(len(values))))
    objects: dict[str, int] = {}
    for obj in (stack.workdir / "archive").rglob("*.jsonl.zst"):
        objects[str(obj.parent)] = objects.get(str(obj.parent), 0) + 1
    assert max(objects.values()) <= 10
