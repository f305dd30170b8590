"""The Celery app: Redis broker, two queues routed by name, at-least-once delivery.

Tasks are acknowledged late and requeued when their worker dies, so a killed worker's task
runs again; every task is idempotent (see sluice.handover.batches), which makes the repeat harmless.
Prefetch is off: a worker takes a task only when it can run it, so what waits stays in the queue
where another worker, or the autoscaler, sees it (sluice.ops.queues). Every task message carries
sluice's task protocol version, and a worker leaves a version it does not read for one that does
(sluice.core.protocol).
"""

from __future__ import annotations

import gc
import logging
import time
import uuid
from typing import Any

import redis
from celery import Celery, Task, signals
from celery.exceptions import Reject
from kombu import Queue

from beat_schedule import beat_schedule
from sluice.core.protocol import TASK_HEADER, TASK_PROTOCOL, TASKS_READ, task_version
from sluice.core.redis_client import connection_options, get_redis
from sluice.core.redis_url import celery_broker
from sluice.core.schema import QUEUED_TTL_SECONDS
from sluice.core.settings import SettingsError, get_settings
from sluice.ops import queues, repair
from tasks.deps import queued_tasks, router

log = logging.getLogger("sluice.tasks")

try:
    settings = get_settings()
except SettingsError as exc:  # one line, not a traceback, and no worker half-started
    raise SystemExit(f"sluice: {exc}") from None
settings.spool_dir.mkdir(parents=True, exist_ok=True)  # Beat keeps its schedule file there

# Headers of every task message sluice sends.
HEADERS = {TASK_HEADER: TASK_PROTOCOL}
# A worker that meets a task of a version it does not read waits this long before putting it
# back, so it does not spin on it while a worker that reads it is on its way.
REQUEUE_DELAY_SECONDS = 1.0


class SluiceTask(Task):
    """Runs a task only if this worker reads its protocol version; puts it back otherwise. A task
    that Redis refuses because its state is not yet checked against the spool (a restarted or
    replaced server: sluice.ops.repair) repairs it, or waits for the process that does, sends the
    split of every batch in flight again (tasks lost with the forgotten writes), and runs again."""

    _refused: set[str] = set()  # ids logged already, so each is logged once per process
    # Whether a refusal of an unchecked state makes this task run the repair (or wait for it).
    # Not the compress task: its time limit must not be spent on a repair a prefork child would
    # be killed in; it retries a second later, once an io task, the bridge or Beat's sweep has
    # repaired the state.
    repairs_state = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        version = task_version(self.request)
        if version not in TASKS_READ and not self.request.is_eager:
            if self.request.id not in self._refused:
                self._refused.add(self.request.id)
                log.warning("task %s[%s] has protocol version %s; this worker reads %s: left in the queue "
                            "for a worker that does", self.name, self.request.id, version, sorted(TASKS_READ))
            time.sleep(REQUEUE_DELAY_SECONDS)
            raise Reject(f"protocol version {version}", requeue=True)
        try:
            return super().__call__(*args, **kwargs)
        except redis.ResponseError as exc:
            if not repair.unverified(exc) or not self.repairs_state:
                raise
        resend_after_repair()
        return super().__call__(*args, **kwargs)

    def retry(self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None, throw: bool = True,
              eta: Any = None, countdown: float | None = None, max_retries: int | None = None,
              **options: Any) -> Any:
        """A task retried on a Redis error (autoretry_for) repairs first if that error is the
        refusal of a state not yet checked, then retries at once. One that lost Redis itself is
        handed back to its queue by the worker's main process (Reject) instead of publishing its
        retry from here: that publish would wait on the same unreachable Redis past the task's
        time limit, and a pool process killed at its hard limit mid-reply took the worker's main
        process down with it (issue 25 item 10)."""
        if isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
            time.sleep(REQUEUE_DELAY_SECONDS)  # not a tight loop while Redis is away
            raise Reject(exc, requeue=True)
        if exc is not None and repair.unverified(exc):
            if self.repairs_state:
                resend_after_repair()
            countdown = 0 if self.repairs_state else 1
        return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **options)


BROKER_URL, BROKER_OPTIONS = celery_broker(settings.redis_url.get_secret_value())
app = Celery("sluice", broker=BROKER_URL, task_cls=SluiceTask,
             include=["tasks.split", "tasks.compress", "tasks.upload"])
app.conf.update(
    task_queues=[Queue(name) for name in queues.QUEUES],
    task_default_queue="io",
    task_routes={
        "sluice.split": {"queue": "io"},
        "sluice.upload": {"queue": "io"},
        "sluice.upload_app_hour": {"queue": "io"},
        "sluice.redrive": {"queue": "io"},
        "sluice.compress": {"queue": "cpu"},
    },
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    task_ignore_result=True,
    worker_prefetch_multiplier=1,
    worker_disable_prefetch=True,
    worker_send_task_events=True,  # for Flower
    task_send_sent_event=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": QUEUED_TTL_SECONDS, **connection_options(), **BROKER_OPTIONS},
    beat_schedule=beat_schedule(settings, HEADERS),
    beat_scheduler="beat_schedule:WorkGatedScheduler",
    beat_schedule_filename=str(settings.spool_dir / "celerybeat-schedule"),
    worker_hijack_root_logger=False,
)


@signals.celeryd_init.connect
def _unacked_per_queue(conf: Any = None, options: Any = None, **_: object) -> None:
    """A worker of one queue keeps what it has taken in that queue's own unacked hash, so the
    autoscaler can count it per queue (sluice.ops.queues)."""
    names = (options or {}).get("queues") or []
    names = names.split(",") if isinstance(names, str) else list(names)
    if len(names) == 1 and conf is not None:
        conf.broker_transport_options = {
            **conf.broker_transport_options,
            "unacked_key": queues.unacked_key(names[0]),
            "unacked_index_key": queues.unacked_index_key(names[0]),
            "unacked_mutex_key": queues.unacked_mutex_key(names[0]),
        }


@signals.worker_init.connect
@signals.worker_process_init.connect
def _freeze_start_up_objects(**_: object) -> None:
    """What a worker has built by the time it starts lives as long as it does: out of the cyclic
    collector's sight, full collections no longer walk it (as in the bridge, bridge.__main__)."""
    gc.freeze()


def send(task: str, args: list[Any], task_id: str | None = None, **options: Any) -> None:
    """Send a task with sluice's headers."""
    app.send_task(task, args=args, task_id=task_id or uuid.uuid4().hex, headers=HEADERS, **options)


def resend_after_repair() -> None:
    """Repair Redis's state unless it is checked already (sluice.ops.repair), and if this process
    ran the repair, send the split of every batch in flight: their tasks may have gone with the
    writes Redis lost, and a split repeats only what is still pending."""
    report = repair.ensure_verified(get_redis(), settings, router())
    for bid in report.resend if report is not None else []:
        enqueue("sluice.split", bid)


def enqueue(task: str, bid: str, *args: object) -> None:
    """Send a task about batch `bid`, noted as queued first, so the redrive leaves it alone."""
    task_id = uuid.uuid4().hex
    queued_tasks().will_queue(bid, task_id)
    try:
        send(task, [bid, *args], task_id)
    except BaseException:
        queued_tasks().started(bid, task_id)
        raise
