"""The Celery queues as kombu's Redis transport lays them out: what waits, and what workers hold.

A queue is a Redis list of JSON messages (`waiting`). A task a worker has taken sits in kombu's
unacked hash until the worker acknowledges it (tasks are acknowledged late), and each worker keeps
its queue's in a hash of its own (`unacked_key`, set by tasks.app), so what one queue's workers
hold can be counted (`unacked`). Waiting plus unacked is what a queue's workers have to do: the
figure that scales them (deploy/keda.yaml, sluice_queue_*_tasks).
"""

from __future__ import annotations

import json

import redis

QUEUES = ("io", "cpu")


def unacked_key(queue: str) -> str:
    """kombu's unacked hash of the workers of one queue."""
    return f"unacked:{queue}"


def unacked_index_key(queue: str) -> str:
    return f"unacked_index:{queue}"


def unacked_mutex_key(queue: str) -> str:
    return f"unacked_mutex:{queue}"


def waiting(r: redis.Redis, queue: str) -> int:
    """Tasks waiting in the queue, not yet taken by a worker."""
    return int(r.llen(queue))


def unacked(r: redis.Redis, queue: str) -> int:
    """Tasks of the queue a worker has taken and not yet acknowledged: reserved or running."""
    return int(r.hlen(unacked_key(queue)))


def waiting_task_ids(r: redis.Redis, queues: tuple[str, ...] = QUEUES) -> set[str]:
    """Ids of the tasks waiting in these queues. A task a worker has taken is not among them:
    that worker may have died holding it (its message then waits out the visibility timeout)."""
    ids = set()
    for queue in queues:
        for raw in r.lrange(queue, 0, -1):
            try:
                ids.add(json.loads(raw)["headers"]["id"])
            except (ValueError, KeyError, TypeError):
                continue  # not a task message of ours
    return ids
