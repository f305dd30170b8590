"""Versions, so that old and new sluice processes can run side by side during a gray upgrade.

- Task messages carry `TASK_HEADER`: the version of their arguments' meaning. A worker runs the
  versions in `TASKS_READ` (its own and the older ones it stays compatible with) and puts a task
  of any other version back on its queue for a worker that reads it (tasks.app). A message with
  no version predates versions and is version 1.
- Redis holds the version of its schema (sluice.core.schema) under `schema.SCHEMA_VERSION` as
  "major.minor". A process whose major differs from Redis's stops at start-up: a new major means
  the keys or scripts changed in a way older code would misread. A minor version adds only what
  older code ignores, and older code may go on using it. A process started while Redis does not
  answer checks as soon as it does (`check_schema_once_reachable`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time

import redis

from sluice.core import schema, scripts
from sluice.core.errors import SluiceError

TASK_HEADER = "sluice_protocol"
TASK_PROTOCOL = 1
TASKS_READ = frozenset({1})

SCHEMA_MAJOR = 1
# 1.1: schema.VERIFIED, schema.REPAIRS (sluice.ops.repair), which 1.0 ignores.
SCHEMA_MINOR = 1
SCHEMA_RETRY_SECONDS = 2.0

log = logging.getLogger(__name__)


class SchemaMismatch(SluiceError):
    """Redis holds a schema of another major version than this process's."""


def task_version(headers: object) -> int:
    """The protocol version a message's headers name (1 for messages that name none)."""
    value = getattr(headers, TASK_HEADER, None) if not isinstance(headers, dict) else headers.get(TASK_HEADER)
    try:
        return int(value) if value is not None else 1
    except (TypeError, ValueError):
        return -1  # unreadable: no worker runs it


def check_schema(r: redis.Redis) -> str:
    """Record this process's schema version in Redis if none is, and raise SchemaMismatch if
    Redis holds another major version; the version found."""
    mine = f"{SCHEMA_MAJOR}.{SCHEMA_MINOR}"
    r.set(schema.SCHEMA_VERSION, mine, nx=True)
    found = (r.get(schema.SCHEMA_VERSION) or mine.encode()).decode()
    major = int(found.split(".")[0]) if found.split(".")[0].isdigit() else -1
    if major != SCHEMA_MAJOR:
        newer = major > SCHEMA_MAJOR
        raise SchemaMismatch(
            f"Redis holds sluice schema {found}, this sluice uses {mine}: "
            + ("upgrade this process to a sluice that uses it" if newer
               else "run the migration of the release notes before starting this version"))
    if found != mine and int(found.split(".")[1]) < SCHEMA_MINOR:
        if int(found.split(".")[1]) < 1 and not r.exists(schema.VERIFIED):
            # A release before 1.1 kept this state, on a Redis it trusted never to forget: it is
            # taken as checked; from now on a restarted or replaced server is repaired first.
            r.register_script(scripts.MARK_VERIFIED)(keys=[schema.VERIFIED])
        r.set(schema.SCHEMA_VERSION, mine)  # a newer minor adds only what older code ignores
    return found


def check_schema_once_reachable(client: redis.Redis, who: str) -> None:
    """`check_schema` in a thread of its own, again every SCHEMA_RETRY_SECONDS until Redis
    answers: a process started during a Redis outage must not go on, once Redis is back, against
    a schema of another major. On a mismatch the process exits with status 2 and one line, as at
    start-up (its tasks are idempotent and acknowledged late, so they run again elsewhere)."""
    log.warning("sluice %s: Redis does not answer; its schema version is checked once it does", who)

    def check() -> None:
        while True:
            try:
                check_schema(client)
                return
            except SchemaMismatch as exc:
                print(f"sluice {who}: {exc}", file=sys.stderr, flush=True)
                os._exit(2)
            except redis.RedisError:
                time.sleep(SCHEMA_RETRY_SECONDS)  # the outage's length is not ours to know

    threading.Thread(target=check, name="schema-check", daemon=True).start()
