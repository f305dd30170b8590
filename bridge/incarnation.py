"""Telling a replay from a new incarnation of a topic.

The ledger drops records at or below a partition's high-water mark as replays. That is right
after a crash or an offset reset, and wrong after the topic was deleted and recreated (or the
cluster rebuilt): the new incarnation's offsets start again at 0 and its records are new.
kafka-python 2.3 cannot see topic ids (Metadata v10+), so the mark carries a fingerprint of the
record at its offset instead (sluice.handover.kafka_probe). Before records at or below the mark
are dropped, the record now at that offset is compared with it: the same record means a replay;
a different record, or none at all (the log no longer reaches the mark), means a new incarnation.
"""

from __future__ import annotations

import logging
from typing import Callable

from kafka import TopicPartition

from sluice.handover.kafka_batches import Chunk, record_at
from sluice.handover.kafka_probe import ProbeInconclusive, fingerprint
from sluice.handover.marks import Mark, Marks

log = logging.getLogger("sluice.bridge")

# (partition, offset) -> (offset, fingerprint) of the first record at or after it, or None.
Probe = Callable[[TopicPartition, int], "tuple[int, str] | None"]

def same_incarnation(mark: int, mark_fingerprint: str, seen: tuple[int, str] | None) -> bool:
    """Whether the log still holds the record of the mark.

    `seen` is the first record the broker now has at or after the mark (its offset and
    fingerprint), None if it has none.
    """
    if seen is None:
        return False  # the log is shorter than what was handed over
    offset, found = seen
    if offset != mark:
        return True  # the mark's record was compacted or aged away; the log goes on past it
    return found == mark_fingerprint


class IncarnationGuard:
    """The bridge's view of which incarnation each partition's mark belongs to.

    Records at or below a mark are checked before they are dropped as a replay; so are the
    first records after a rebalance or a quiet spell, and a partition quiet for a while is
    probed (its topic may have been recreated under us, its new log not yet past our position).
    """

    def __init__(self, marks: Marks, probe: Probe, check_seconds: float) -> None:
        self.marks = marks
        self.probe = probe
        self.period = check_seconds
        self._verified: dict[TopicPartition, int] = {}  # marks found to be of this incarnation
        self._last_records: dict[TopicPartition, float] = {}  # when records last came
        self._last_probe: dict[TopicPartition, float] = {}

    def records_came(self, tp: TopicPartition, now: float) -> bool:
        """Note that records came; True if they are the first after a rebalance or a quiet
        spell, so their incarnation must be checked before they are handed over."""
        last = self._last_records.get(tp)
        self._last_records[tp] = now
        return last is None or now - last >= self.period

    def assigned(self, tp: TopicPartition) -> None:
        """A partition (re)assigned: its first records are checked, the topic may be a new one."""
        self._last_records.pop(tp, None)

    def same(self, tp: TopicPartition, mark: Mark, chunks: list[Chunk], cached: bool = True) -> bool:
        """Is what the broker holds at the mark still the record that was handed over there?"""
        if not mark.fingerprint or mark.last is None or (cached and self._verified.get(tp) == mark.last):
            return True
        at_mark = record_at(chunks, mark.last)
        seen = (mark.last, fingerprint(at_mark)) if at_mark is not None else self.probe(tp, mark.last)
        same = same_incarnation(mark.last, mark.fingerprint, seen)
        if same:
            self._verified[tp] = mark.last
        return same

    def start_new(self, tp: TopicPartition, mark: Mark) -> None:
        """Forget the old incarnation's mark; its next records are archived anew."""
        if self.marks.new_incarnation(tp.topic, tp.partition, mark.last):
            log.warning("%s:%d no longer holds the record handed over at offset %s: the topic was "
                        "recreated, or its log truncated; reading it again from its beginning and "
                        "archiving it as incarnation %d", tp.topic, tp.partition, mark.last,
                        mark.incarnation + 1)
        self._verified.pop(tp, None)

    def recreated_quiet_partitions(self, assignment: set[TopicPartition], now: float) -> list[TopicPartition]:
        """Quiet partitions whose mark no longer matches the broker's record: each has had its
        new incarnation started; the caller reads them again from their beginning."""
        recreated = []
        for tp in assignment:
            if now - self._last_records.setdefault(tp, now) < self.period \
                    or now - self._last_probe.get(tp, 0.0) < self.period:
                continue
            self._last_probe[tp] = now
            mark = self.marks.mark(tp.topic, tp.partition)
            try:
                same = mark.last is None or self.same(tp, mark, [], cached=False)
            except ProbeInconclusive as exc:
                log.warning("%s; checked again in %.0fs", exc, self.period)
                continue
            if not same:
                self.start_new(tp, mark)
                recreated.append(tp)
        return recreated
