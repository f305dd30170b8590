"""Batch ids: which offsets of which partition (and incarnation) a handed-over batch holds.
The payload itself is the Kafka record batches as fetched (sluice.kafka_batches)."""

from __future__ import annotations


def batch_id(topic: str, partition: int, first: int, last: int, incarnation: int = 0) -> str:
    """Deterministic: the same offsets always give the same id, so replays are recognisable.
    A recreated topic's batches carry its incarnation, so they never meet the old ones' ids."""
    suffix = f"@{incarnation}" if incarnation else ""
    return f"{topic}:{partition}:{first}-{last}{suffix}"


def parse_batch_id(ref: str) -> tuple[str, int, int, int]:
    topic, partition, span = ref.rsplit(":", 2)
    first, last = span.partition("@")[0].split("-")
    return topic, int(partition), int(first), int(last)
