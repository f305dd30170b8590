"""The Celery app: Redis broker, two queues routed by name, at-least-once delivery.

Tasks are acknowledged late and requeued when their worker dies, so a killed worker's task
runs again; every task is idempotent (see sluice.batches), which makes the repeat harmless.
"""

from __future__ import annotations

import gc
import json
import uuid

import redis
from celery import Celery, signals
from kombu import Queue

from beat_schedule import beat_schedule
from sluice.schema import QUEUED_TTL_SECONDS
from sluice.settings import SettingsError, get_settings
from tasks.deps import queued_tasks

try:
    settings = get_settings()
except SettingsError as exc:  # one line, not a traceback, and no worker half-started
    raise SystemExit(f"sluice: {exc}") from None
settings.spool_dir.mkdir(parents=True, exist_ok=True)  # Beat keeps its schedule file there

app = Celery("sluice", broker=settings.redis_url.get_secret_value(),
             include=["tasks.split", "tasks.compress", "tasks.upload"])
app.conf.update(
    task_queues=[Queue("io"), Queue("cpu")],
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
    worker_send_task_events=True,  # for Flower
    task_send_sent_event=True,
    broker_connection_retry_on_startup=True,
    broker_transport_options={"visibility_timeout": QUEUED_TTL_SECONDS},
    beat_schedule=beat_schedule(settings),
    beat_schedule_filename=str(settings.spool_dir / "celerybeat-schedule"),
    worker_hijack_root_logger=False,
)


@signals.worker_init.connect
@signals.worker_process_init.connect
def _freeze_start_up_objects(**_: object) -> None:
    """What a worker has built by the time it starts lives as long as it does: out of the cyclic
    collector's sight, full collections no longer walk it (as in the bridge, bridge.__main__)."""
    gc.freeze()


def enqueue(task: str, bid: str, *args: object) -> None:
    """Send a task about batch `bid`, noted as queued first, so the redrive leaves it alone."""
    task_id = uuid.uuid4().hex
    queued_tasks().will_queue(bid, task_id)
    try:
        app.send_task(task, args=[bid, *args], task_id=task_id)
    except BaseException:
        queued_tasks().started(bid, task_id)
        raise


def waiting_task_ids(r: redis.Redis, queues: tuple[str, ...] = ("io", "cpu")) -> set[str]:
    """Ids of the tasks waiting in these queues: kombu's Redis transport keeps each queue as a
    list of JSON messages. A task a worker has taken is not among them: that worker may have
    died holding it (its message then waits out the visibility timeout)."""
    ids = set()
    for queue in queues:
        for raw in r.lrange(queue, 0, -1):
            try:
                ids.add(json.loads(raw)["headers"]["id"])
            except (ValueError, KeyError, TypeError):
                continue  # not a task message of ours
    return ids
