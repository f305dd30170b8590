"""Versions, so that old and new sluice processes can run side by side during a gray upgrade.

- Task messages carry `TASK_HEADER`: the version of their arguments' meaning. A worker runs the
  versions in `TASKS_READ` (its own and the older ones it stays compatible with) and puts a task
  of any other version back on its queue for a worker that reads it (tasks.app). A message with
  no version predates versions and is version 1.
- Redis holds the version of its schema (sluice.schema) under `schema.SCHEMA_VERSION` as
  "major.minor". A process whose major differs from Redis's stops at start-up: a new major means
  the keys or scripts changed in a way older code would misread. A minor version adds only what
  older code ignores, and older code may go on using it.
"""

from __future__ import annotations

import redis

from sluice import schema
from sluice.errors import SluiceError

TASK_HEADER = "sluice_protocol"
TASK_PROTOCOL = 1
TASKS_READ = frozenset({1})

SCHEMA_MAJOR = 1
SCHEMA_MINOR = 0


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
        r.set(schema.SCHEMA_VERSION, mine)  # a newer minor adds only what older code ignores
    return found
