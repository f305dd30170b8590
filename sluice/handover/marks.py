"""Partition marks: how far each partition has been handed over, and in which incarnation.

The mark (`schema.HWM`) is the ledger of handed-over offsets: the bridge drops records at or
below it, so a Kafka replay after a crash is never handed over twice. It keeps a fingerprint of
the record at the mark and the incarnation of the topic it belongs to, so a recreated topic is
told from a replay (bridge.incarnation). The mark moves only in the hand-over script
(sluice.handover.batches), together with the batch it covers.
"""

from __future__ import annotations

from dataclasses import dataclass

import redis

from sluice.core import schema, scripts


@dataclass(frozen=True)
class Mark:
    """How far a partition has been handed over, and in which incarnation of its topic."""

    last: int | None  # the last offset handed over, None before the first hand-over
    fingerprint: str | None  # of the record at `last` (None for marks older than fingerprints)
    incarnation: int


class Marks:
    """Reads the marks and starts new incarnations."""

    def __init__(self, client: redis.Redis) -> None:
        self.r = client
        self._new_incarnation = client.register_script(scripts.NEW_INCARNATION)

    def high_water_mark(self, topic: str, partition: int) -> int | None:
        """Last offset of this partition already handed over, or None."""
        value = self.r.hget(schema.HWM, schema.partition_field(topic, partition))
        return int(value) if value is not None else None

    def mark(self, topic: str, partition: int) -> Mark:
        field = schema.partition_field(topic, partition)
        with self.r.pipeline(transaction=False) as pipe:
            for key in (schema.HWM, schema.FINGERPRINT, schema.INCARNATION):
                pipe.hget(key, field)
            last, fingerprint, incarnation = pipe.execute()
        return Mark(int(last) if last is not None else None,
                    fingerprint.decode() if fingerprint is not None else None,
                    int(incarnation or 0))

    def new_incarnation(self, topic: str, partition: int, expected_hwm: int | None) -> bool:
        """Forget the mark of an earlier incarnation of the topic; False if the mark moved."""
        return bool(self._new_incarnation(
            keys=[schema.HWM, schema.FINGERPRINT, schema.EARLIER, schema.INCARNATION],
            args=[schema.partition_field(topic, partition),
                  "" if expected_hwm is None else str(expected_hwm)]) >= 0)

    def partitions(self, topic: str | None = None) -> list[tuple[str, int]]:
        """Every partition with a mark or an incarnation (of one topic, if given), sorted."""
        with self.r.pipeline(transaction=False) as pipe:
            pipe.hkeys(schema.HWM)
            pipe.hkeys(schema.INCARNATION)
            names = {name.decode() for reply in pipe.execute() for name in reply}
        found = [schema.parse_partition_field(name) for name in names]
        return sorted(p for p in found if topic is None or p[0] == topic)

    def earlier(self, topic: str, partition: int) -> int:
        """Records handed over by the partition's earlier incarnations."""
        return int(self.r.hget(schema.EARLIER, schema.partition_field(topic, partition)) or 0)

    def handed_over(self) -> int:
        """Records handed over since Redis was first used, earlier incarnations included."""
        return records_handed_over(self.r.hvals(schema.HWM), self.r.hvals(schema.EARLIER))


def records_handed_over(marks: list[bytes], earlier: list[bytes]) -> int:
    """From the values of HWM and EARLIER (offsets start at 0 per partition)."""
    return sum(int(v) + 1 for v in marks) + sum(int(v) for v in earlier)
