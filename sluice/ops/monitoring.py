"""What an operator asks of the pipeline, read from Redis and Kafka: the figures behind the
Prometheus metrics the bridge serves (bridge.metrics) and behind `sluice status`.

Pipeline-wide figures come from Redis, so every bridge reports the same value: an operator takes
max() of them over the scraped targets. Per-partition figures come from the bridge that holds the
partition (sum() or max() over targets).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import redis
from kafka import TopicPartition

from sluice.core import schema
from sluice.formats.records import hour_of
from sluice.handover.kafka_probe import Prober
from sluice.handover.marks import Marks, records_handed_over
from sluice.ops import queues

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartitionLag:
    """How far one partition's hand-over is behind its log."""

    topic: str
    partition: int
    log_end: int  # the offset after the last record in the log
    next_offset: int  # the next offset to hand over (the mark plus one)
    lag_records: int
    lag_seconds: float  # age of the oldest record not yet handed over (0 when there is none)


def partition_lag(prober: Prober, marks: Marks, tp: TopicPartition, now: float,
                  log_end: int | None = None, first_buffered: int | None = None,
                  first_buffered_ms: int | None = None) -> PartitionLag:
    """The lag of one partition. Where the caller knows them, `log_end` and the first record it
    holds and has not handed over (offset and Kafka timestamp) spare a probe of the broker."""
    mark = marks.high_water_mark(tp.topic, tp.partition)
    next_offset = mark + 1 if mark is not None else 0
    oldest_ms = first_buffered_ms if first_buffered == next_offset else None
    start = next_offset
    if log_end is None or (oldest_ms is None and log_end > next_offset):
        seen, probed_end = prober.probe(tp, next_offset)
        if seen is not None:
            start, oldest_ms = seen.offset, seen.timestamp_ms
        log_end = probed_end if probed_end is not None else max(log_end or 0, start)
    lag_records = max(log_end - start, 0)
    lag_seconds = max(now - oldest_ms / 1000, 0.0) if lag_records and oldest_ms is not None else 0.0
    return PartitionLag(tp.topic, tp.partition, log_end, next_offset, lag_records, lag_seconds)


@dataclass
class PipelineFigures:
    """Pipeline-wide figures, as Redis has them at `now`."""

    now: float
    handed_over: int = 0
    inflight_batches: int = 0
    inflight_bytes: int = 0
    inflight_oldest_ms: float | None = None  # first record of the oldest batch not yet compressed
    pending_oldest_ms: float | None = None  # oldest record compressed, not yet archived
    open_files: int = 0
    open_bytes: int = 0
    sealed_files: int = 0
    sealed_bytes: int = 0
    counters: dict[str, float] = field(default_factory=dict)
    quarantined: dict[str, int] = field(default_factory=dict)
    archived_records: dict[str, int] = field(default_factory=dict)
    archived_bytes: dict[str, int] = field(default_factory=dict)
    recent_records: dict[str, int] = field(default_factory=dict)  # this hour and the one before
    queue_waiting: dict[str, int] = field(default_factory=dict)  # Celery queue -> tasks waiting
    queue_unacked: dict[str, int] = field(default_factory=dict)  # Celery queue -> tasks taken, not done
    repairs: dict[str, str] = field(default_factory=dict)  # schema.REPAIRS (sluice.ops.repair)

    def age(self, timestamp_ms: float | None) -> float:
        return max(self.now - timestamp_ms / 1000, 0.0) if timestamp_ms is not None else 0.0

    @property
    def oldest_unfetchable_age(self) -> float:
        """Of what is handed over and not yet compressed (records not yet handed over are in
        the partitions' lag)."""
        return self.age(self.inflight_oldest_ms)

    @property
    def oldest_unarchived_age(self) -> float:
        """Of what is handed over and not yet uploaded."""
        return max(self.oldest_unfetchable_age, self.age(self.pending_oldest_ms))

    def counter(self, name: schema.Counter) -> float:
        return self.counters.get(name.value, 0.0)


def read_pipeline(r: redis.Redis, now: float | None = None) -> PipelineFigures:
    """Every pipeline-wide figure in two round trips."""
    now = time.time() if now is None else now
    hours = [hour_of(now), hour_of(now - 3600)]
    with r.pipeline(transaction=False) as pipe:
        pipe.hvals(schema.HWM)
        pipe.hvals(schema.EARLIER)
        pipe.zcard(schema.INFLIGHT)
        pipe.get(schema.INFLIGHT_BYTES)
        pipe.zrange(schema.INFLIGHT_OLDEST, 0, 0, withscores=True)
        pipe.zrange(schema.PENDING_OLDEST, 0, 0, withscores=True)
        pipe.smembers(schema.SLOTS)
        pipe.hvals(schema.SEALED)
        pipe.hgetall(schema.COUNTERS)
        pipe.hgetall(schema.QUARANTINED)
        pipe.hgetall(schema.ARCHIVED_RECORDS)
        pipe.hgetall(schema.ARCHIVED_BYTES)
        pipe.hgetall(schema.REPAIRS)
        for hour in hours:
            pipe.hgetall(schema.hourly_records(hour))
        for queue in queues.QUEUES:
            pipe.llen(queue)
            pipe.hlen(queues.unacked_key(queue))
        (hwm, earlier, inflight, inflight_bytes, inflight_oldest, pending_oldest, slots, sealed,
         counters, quarantined, archived_records, archived_bytes, repairs, *rest) = pipe.execute()
    recent, queue_sizes = rest[:len(hours)], rest[len(hours):]
    with r.pipeline(transaction=False) as pipe:
        for sid in slots:
            pipe.hget(schema.slot_state(sid.decode()), "size")
        sizes = pipe.execute() if slots else []
    recent_records: dict[str, int] = {}
    for per_app in recent:
        for app, count in per_app.items():
            recent_records[app.decode()] = recent_records.get(app.decode(), 0) + int(count)
    return PipelineFigures(
        now=now,
        handed_over=records_handed_over(hwm, earlier),
        inflight_batches=int(inflight),
        inflight_bytes=int(inflight_bytes or 0),
        inflight_oldest_ms=inflight_oldest[0][1] if inflight_oldest else None,
        pending_oldest_ms=pending_oldest[0][1] if pending_oldest else None,
        open_files=len(slots),
        open_bytes=sum(int(size) for size in sizes if size is not None),
        sealed_files=len(sealed),
        sealed_bytes=sum(int(size) for size in sealed),
        counters={k.decode(): float(v) for k, v in counters.items()},
        quarantined={k.decode(): int(v) for k, v in quarantined.items()},
        archived_records={k.decode(): int(v) for k, v in archived_records.items()},
        archived_bytes={k.decode(): int(v) for k, v in archived_bytes.items()},
        recent_records=recent_records,
        queue_waiting=dict(zip(queues.QUEUES, (int(n) for n in queue_sizes[0::2]))),
        queue_unacked=dict(zip(queues.QUEUES, (int(n) for n in queue_sizes[1::2]))),
        repairs={k.decode(): v.decode() for k, v in repairs.items()},
    )


OTHER_APPS = "_other"


def top_apps(per_app: dict[str, int], k: int, by: dict[str, int] | None = None) -> dict[str, int]:
    """The `k` apps largest by `by` (default: by the values themselves), the rest summed as
    "_other" (no app id starts with "_"): a bounded number of label values however many apps
    there are."""
    order = by if by is not None else per_app
    ranked = sorted(per_app, key=lambda app: (-order.get(app, 0), app))
    out = {app: per_app[app] for app in ranked[:k]}
    if len(ranked) > k:
        out[OTHER_APPS] = sum(per_app[app] for app in ranked[k:])
    return out


@dataclass(frozen=True)
class SpoolSpace:
    used: int
    free: int


# The last statvfs failure spool_space logged, so a scrape every few seconds logs it once.
_spool_space_error: str | None = None


def spool_space(spool_dir: Path) -> SpoolSpace | None:
    """Bytes used and free on the spool's file system, as this machine sees it; None (and a
    WARNING, once per distinct error) if it cannot be read: the spool gauges then go missing,
    and with them the spool-full alert."""
    global _spool_space_error
    try:
        st = os.statvfs(spool_dir)
    except OSError as exc:
        error = f"{spool_dir}: {exc.strerror or exc}"
        if error != _spool_space_error:
            _spool_space_error = error
            log.warning("cannot read the free space of the spool directory %s (%s): "
                        "sluice_spool_used_bytes and sluice_spool_free_bytes are left out until it can",
                        spool_dir, exc.strerror or exc)
        return None
    _spool_space_error = None
    return SpoolSpace((st.f_blocks - st.f_bfree) * st.f_frsize, st.f_bavail * st.f_frsize)
