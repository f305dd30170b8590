"""A worker's start-up check and heartbeat, as a bootstep of the Celery worker.

At start the worker checks the Redis schema version (sluice.core.protocol) and stops with one line if
it cannot read it. Then, every HEARTBEAT_SECONDS on the worker's own timer (so a hung worker
stops touching it), it touches its `alive` file and keeps its `ready` file while it has started,
is not shutting down and reaches Redis (sluice.ops.health).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import redis
from celery import bootsteps, signals

from sluice.core.protocol import SchemaMismatch, check_schema, check_schema_once_reachable
from sluice.core.redis_client import client_for, connection_options
from sluice.core.settings import get_settings
from sluice.ops.health import HEARTBEAT_SECONDS, HealthFiles
from tasks.app import app

log = logging.getLogger("sluice.tasks")

_state = {"started": False}


def _redis() -> redis.Redis:
    """A client of its own, quick to give up (a probe's answer must not wait), with sluice's
    keepalive, so an idle one is found dead like every other connection."""
    return client_for(get_settings().redis_url.get_secret_value(),
                      **{**connection_options(), "socket_connect_timeout": 2, "socket_timeout": 2})


class Heartbeat(bootsteps.StartStopStep):
    requires = {"celery.worker.components:Timer"}

    def __init__(self, worker: Any, **kwargs: Any) -> None:
        super().__init__(worker, **kwargs)
        self.files = HealthFiles(get_settings().health_dir)
        self.client = _redis()
        self.timer_ref: Any = None

    def start(self, worker: Any) -> None:
        try:
            check_schema(self.client)
        except SchemaMismatch as exc:
            print(f"sluice worker: {exc}", file=sys.stderr, flush=True)
            os._exit(2)  # before it takes any task; Celery would turn an exception into a traceback
        except redis.RedisError:
            check_schema_once_reachable(self.client, "worker")  # it waits for its broker meanwhile
        self.files.alive(force=True)
        self.timer_ref = worker.timer.call_repeatedly(HEARTBEAT_SECONDS, self.beat)

    def beat(self) -> None:
        self.files.alive(force=True)
        try:
            reachable = bool(self.client.ping())
        except redis.RedisError:
            reachable = False
        self.files.ready(_state["started"] and reachable)

    def stop(self, worker: Any) -> None:
        _state["started"] = False
        self.files.ready(False)
        if self.timer_ref is not None:
            self.timer_ref.cancel()


app.steps["worker"].add(Heartbeat)


@signals.beat_init.connect
def _beat_checks_the_schema(**_: object) -> None:
    try:
        check_schema(_redis())
    except SchemaMismatch as exc:
        print(f"sluice beat: {exc}", file=sys.stderr, flush=True)
        os._exit(2)
    except redis.RedisError:
        check_schema_once_reachable(_redis(), "beat")  # Beat waits for its broker meanwhile


@signals.worker_ready.connect
def _ready(**_: object) -> None:
    _state["started"] = True


@signals.worker_shutting_down.connect
def _shutting_down(**_: object) -> None:
    _state["started"] = False
    HealthFiles(get_settings().health_dir).ready(False)
