"""The claim-check batch: how the bridge packs records and how workers get them back."""

from __future__ import annotations

import msgpack

from sluice.records import Record


def batch_id(topic: str, partition: int, first: int, last: int) -> str:
    """Deterministic: the same offsets always give the same id, so replays are recognisable."""
    return f"{topic}:{partition}:{first}-{last}"


def parse_batch_id(ref: str) -> tuple[str, int, int, int]:
    topic, partition, span = ref.rsplit(":", 2)
    first, last = span.split("-")
    return topic, int(partition), int(first), int(last)


def pack(records: list[Record]) -> bytes:
    return msgpack.packb([list(r) for r in records], use_bin_type=True)


def unpack(payload: bytes) -> list[Record]:
    return [
        Record(off, ts, key, value, [(name, hv) for name, hv in headers] if headers else [])
        for off, ts, key, value, headers in msgpack.unpackb(payload, raw=False)
    ]
