"""Which tasks of a batch are still waiting in the broker's queue, for the redrive sweep.

A batch in flight too long is redriven (its split sent again) unless one of its tasks still
waits in a queue: redriving it then would only pile up copies of the same work. A task is
noted before it is sent and un-noted when it starts; the note can be stale (a send or a start
that Redis went down under), so the queue itself has the last word (`waiting`).
"""

from __future__ import annotations

import redis

from sluice.core import schema


class QueuedTasks:
    def __init__(self, client: redis.Redis) -> None:
        self.r = client

    def will_queue(self, bid: str, task_id: str) -> None:
        """Note a task of this batch as queued, before it is sent."""
        key = schema.batch_queued(bid)
        with self.r.pipeline(transaction=False) as pipe:
            pipe.sadd(key, task_id)
            pipe.expire(key, schema.QUEUED_TTL_SECONDS)
            pipe.execute()

    def started(self, bid: str, task_id: str) -> None:
        """A task of this batch left the queue (or was never sent); a retry keeps its id."""
        self.r.srem(schema.batch_queued(bid), task_id)

    def queued(self, bid: str, waiting: set[str]) -> bool:
        """Some task of this batch is among `waiting`, the ids of the tasks in the queues now."""
        return not waiting.isdisjoint(t.decode() for t in self.r.smembers(schema.batch_queued(bid)))
