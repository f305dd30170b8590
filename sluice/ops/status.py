"""`sluice status`: the pipeline on one screen, or as JSON, and whether it is healthy by the
thresholds given, for a person, a script, cron or a probe.

Pipeline-wide figures come from Redis (sluice.ops.monitoring); each partition's lag from the broker
(sluice.handover.kafka_probe), as the bridge's metrics have them; the workers from a Celery ping.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import redis
from kafka import TopicPartition
from kafka.errors import KafkaError

from sluice.core import schema
from sluice.core.schema import Counter
from sluice.core.settings import Settings
from sluice.handover.kafka_probe import Prober
from sluice.handover.marks import Marks
from sluice.ops.monitoring import PartitionLag, partition_lag, read_pipeline, top_apps

PROBE_SECONDS = 5.0
PING_SECONDS = 1.0
TOP_APPS = 10


@dataclass
class Thresholds:
    """Above any of these the pipeline is unhealthy (None: not checked)."""

    max_lag_seconds: float | None = None
    max_lag_records: int | None = None
    max_unarchived_age: float | None = None
    min_workers: int | None = None


@dataclass
class TopicLag:
    lag_records: int
    lag_seconds: float
    partitions: list[PartitionLag] = field(default_factory=list)


@dataclass
class Status:
    topics: dict[str, TopicLag] | None  # None: Kafka could not be asked
    oldest_unfetchable_age_seconds: float
    oldest_unarchived_age_seconds: float
    inflight_batches: int
    inflight_bytes: int
    open_files: int
    open_bytes: int
    sealed_files: int
    sealed_bytes: int
    quarantined: dict[str, int]
    records_handed_over: int
    records_archived: int
    uploads_ok: int
    uploads_failed: int
    last_upload_age_seconds: float | None
    top_apps_last_hour: dict[str, int]
    workers: list[str] | None  # None: Celery could not be asked
    queue_waiting: dict[str, int] = field(default_factory=dict)
    queue_unacked: dict[str, int] = field(default_factory=dict)
    # The last repair of Redis's state from the spool (sluice.ops.repair): its kind, when, what
    # it restored or set aside; empty if there was none.
    last_repair: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def as_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["healthy"] = self.healthy
        return out


def topics_of(settings: Settings, prober: Prober) -> list[str]:
    if settings.topic_pattern is None:
        return settings.topics
    pattern = re.compile(settings.topic_pattern)
    return sorted(t for t in prober.topics() if pattern.fullmatch(t) and not t.startswith("__"))


def lags(settings: Settings, client: redis.Redis) -> dict[str, TopicLag]:
    """Every partition's lag, from the broker; KafkaError if it does not answer."""
    prober = Prober(settings.kafka_bootstrap, timeout=PROBE_SECONDS)
    marks = Marks(client)
    try:
        out = {}
        now = time.time()
        for topic in topics_of(settings, prober):
            parts = [partition_lag(prober, marks, TopicPartition(topic, p), now) for p in prober.partitions(topic)]
            out[topic] = TopicLag(sum(p.lag_records for p in parts),
                                  max((p.lag_seconds for p in parts), default=0.0), parts)
        return out
    finally:
        prober.close()


def workers(settings: Settings) -> list[str]:
    """Names of the Celery workers that answer a ping within PING_SECONDS."""
    from celery import Celery

    from sluice.core.redis_url import celery_broker

    broker, options = celery_broker(settings.redis_url.get_secret_value())
    app = Celery("sluice-status", broker=broker, broker_transport_options=options)
    try:
        replies = app.control.ping(timeout=PING_SECONDS) or []
    finally:
        app.close()
    return sorted(name for reply in replies for name in reply)


def gather(settings: Settings, client: redis.Redis, thresholds: Thresholds, ask_workers: bool = True) -> Status:
    """Raises redis.RedisError when Redis cannot be read; Kafka or Celery not answering is a
    problem in the status, not an error."""
    p = read_pipeline(client)
    try:
        topics: dict[str, TopicLag] | None = lags(settings, client)
    except KafkaError:
        topics = None
    seen = workers(settings) if ask_workers else None
    last = p.counters.get(Counter.LAST_UPLOAD.value)
    unfetchable = max([p.oldest_unfetchable_age] + [t.lag_seconds for t in (topics or {}).values()])
    status = Status(
        topics=topics,
        oldest_unfetchable_age_seconds=unfetchable,
        oldest_unarchived_age_seconds=max(unfetchable, p.oldest_unarchived_age),
        inflight_batches=p.inflight_batches, inflight_bytes=p.inflight_bytes,
        open_files=p.open_files, open_bytes=p.open_bytes,
        sealed_files=p.sealed_files, sealed_bytes=p.sealed_bytes,
        quarantined=p.quarantined,
        records_handed_over=p.handed_over, records_archived=sum(p.archived_records.values()),
        uploads_ok=int(p.counter(Counter.UPLOADS_OK)), uploads_failed=int(p.counter(Counter.UPLOADS_FAILED)),
        last_upload_age_seconds=p.now - last if last is not None else None,
        top_apps_last_hour=top_apps(p.recent_records, TOP_APPS),
        workers=seen,
        queue_waiting=p.queue_waiting, queue_unacked=p.queue_unacked,
        last_repair=p.repairs,
    )
    status.problems = problems(status, thresholds)
    return status


def problems(status: Status, t: Thresholds) -> list[str]:
    out = []
    if (t.max_lag_seconds is not None or t.max_lag_records is not None) and status.topics is None:
        out.append("Kafka did not answer: the lag is not known")
    for topic, lag in (status.topics or {}).items():
        if t.max_lag_seconds is not None and lag.lag_seconds > t.max_lag_seconds:
            out.append(f"{topic}: lag {lag.lag_seconds:.0f}s > {t.max_lag_seconds:g}s")
        if t.max_lag_records is not None and lag.lag_records > t.max_lag_records:
            out.append(f"{topic}: lag {lag.lag_records} records > {t.max_lag_records}")
    if t.max_unarchived_age is not None and status.oldest_unarchived_age_seconds > t.max_unarchived_age:
        out.append(f"oldest record not yet archived is {status.oldest_unarchived_age_seconds:.0f}s old "
                   f"> {t.max_unarchived_age:g}s")
    if t.min_workers is not None and len(status.workers or []) < t.min_workers:
        out.append(f"{len(status.workers or [])} workers answered < {t.min_workers}")
    return out


def _repair_line(repair: dict[str, str], now: float) -> str:
    """When Redis's state was last repaired from the spool, what it found and what it did."""
    if "last_at" not in repair:
        return "Redis state repaired     never"
    done = ", ".join(f"{field.replace('_', ' ')} {repair[field]}" for field in schema.REPAIR_FIELDS[3:]
                     if repair.get(field, "0") != "0")
    return (f"Redis state repaired     {now - float(repair['last_at']):>10.0f} s ago ({repair.get('last_kind')})"
            + (f": {done}" if done else "") + f"; set aside in all {repair.get('set_aside_total', '0')}")


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def render(status: Status) -> str:
    """The status for a person."""
    lines = ["healthy" if status.healthy else "UNHEALTHY: " + "; ".join(status.problems), ""]
    if status.topics is None:
        lines.append("lag              unknown: Kafka did not answer")
    for topic, lag in sorted((status.topics or {}).items()):
        lines.append(f"lag {topic:<12} {lag.lag_records:>12,} records {lag.lag_seconds:>10.1f} s "
                     f"({len(lag.partitions)} partitions)")
    lines += [
        f"oldest not yet fetchable  {status.oldest_unfetchable_age_seconds:>10.1f} s",
        f"oldest not yet archived   {status.oldest_unarchived_age_seconds:>10.1f} s",
        f"in flight                 {status.inflight_batches:>10,} batches, {_mb(status.inflight_bytes)}",
        f"open slot files           {status.open_files:>10,} files, {_mb(status.open_bytes)}",
        f"sealed, not yet uploaded  {status.sealed_files:>10,} files, {_mb(status.sealed_bytes)}",
        f"handed over / archived    {status.records_handed_over:>10,} / {status.records_archived:,} records",
        f"uploads ok / failed       {status.uploads_ok:>10,} / {status.uploads_failed:,}"
        + (f", last {status.last_upload_age_seconds:.0f} s ago" if status.last_upload_age_seconds is not None
           else ", none yet"),
        f"quarantined               {sum(status.quarantined.values()):>10,} records"
        + (" (" + ", ".join(f"{r} {n:,}" for r, n in sorted(status.quarantined.items())) + ")"
           if status.quarantined else ""),
    ]
    if status.top_apps_last_hour:
        lines.append("top apps, records this hour and the last:")
        lines += [f"  {app:<24}{n:>12,}" for app, n in status.top_apps_last_hour.items()]
    lines.append("tasks waiting / running  " + ", ".join(
        f"{q} {status.queue_waiting.get(q, 0):,} / {status.queue_unacked.get(q, 0):,}" for q in status.queue_waiting))
    lines.append(_repair_line(status.last_repair, time.time()))
    if status.workers is not None:
        lines.append(f"workers ({len(status.workers)}): " + (", ".join(status.workers) or "none answered"))
    return "\n".join(lines)
