"""The bridge's Prometheus endpoint: its own partitions' lag and backpressure, and the pipeline-wide
figures from Redis (sluice.ops.monitoring), in Prometheus' text format on SLUICE_METRICS_PORT.

Only the bridge serves metrics: the workers and Beat read the same settings and never bind the
port. Pipeline-wide figures are read from Redis at each scrape. Partition lags are worked out by
a thread of their own every LAG_SECONDS, from what the bridge publishes of its buffers and of
the broker's high watermarks, probing the broker only for a partition whose oldest record not
yet handed over the bridge does not hold (paused, or behind): a slow broker never stalls the
hand-over.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version

import redis
from kafka import TopicPartition
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from sluice.core import schema
from sluice.core.errors import SluiceError
from sluice.core.schema import Counter
from sluice.core.settings import Settings
from sluice.formats.records import QUARANTINE_REASONS
from sluice.handover.kafka_probe import ProbeInconclusive, Prober
from sluice.handover.marks import Marks
from sluice.ops.monitoring import PartitionLag, partition_lag, read_pipeline, spool_space, top_apps

log = logging.getLogger("sluice.bridge")

LAG_SECONDS = 5.0


class MetricsPortInUse(SluiceError):
    """SLUICE_METRICS_PORT is taken: the bridge does not start half-way."""


@dataclass(frozen=True)
class LagInput:
    """What the bridge knows of a partition without asking the broker."""

    log_end: int | None  # the broker's high watermark from the last fetch, None if unknown or stale
    first_buffered: int | None  # offset of the first record it holds and has not handed over
    first_buffered_ms: int | None  # its Kafka timestamp


@dataclass
class BridgeState:
    """Published by the bridge's loop, read by the metrics: replaced whole, never mutated."""

    inputs: dict[TopicPartition, LagInput]
    paused: bool = False
    pauses: int = 0


class LagWatcher(threading.Thread):
    """Works out the lag of the bridge's partitions every LAG_SECONDS."""

    def __init__(self, settings: Settings, client: redis.Redis, state: Callable[[], BridgeState]) -> None:
        super().__init__(name="lag-watcher", daemon=True)
        self.marks = Marks(client)
        self.prober = Prober(settings.kafka_bootstrap, timeout=LAG_SECONDS)
        self.state = state
        self.lags: dict[TopicPartition, PartitionLag] = {}
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            while not self.stopping.wait(LAG_SECONDS):
                self.refresh()
        finally:
            self.prober.close()

    def refresh(self) -> None:
        inputs = self.state().inputs
        lags: dict[TopicPartition, PartitionLag] = {}
        now = time.time()
        for tp, known in inputs.items():
            try:
                lags[tp] = partition_lag(self.prober, self.marks, tp, now, known.log_end, known.first_buffered,
                                         known.first_buffered_ms)
            except (ProbeInconclusive, redis.RedisError) as exc:
                log.warning("lag of %s:%d not known (%s)", tp.topic, tp.partition, exc)
                if tp in self.lags:
                    lags[tp] = self.lags[tp]
        self.lags = lags


class PipelineCollector(Collector):
    """Every sluice_ metric, gathered at each scrape."""

    def __init__(self, settings: Settings, client: redis.Redis, state: Callable[[], BridgeState],
                 lags: Callable[[], dict[TopicPartition, PartitionLag]]) -> None:
        self.settings = settings
        self.r = client
        self.state = state
        self.lags = lags
        try:
            self.version = version("sluice")
        except PackageNotFoundError:
            self.version = "unknown"

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily("sluice_build_info", "sluice's version", labels=["version"])
        info.add_metric([self.version], 1)
        yield info
        yield from self._bridge_figures()
        try:
            yield from self._pipeline_figures()
        except redis.RedisError as exc:
            log.warning("pipeline metrics not read: Redis unavailable (%s)", type(exc).__name__)
            up = GaugeMetricFamily("sluice_redis_up", "1 if the last scrape could read Redis")
            up.add_metric([], 0)
            yield up

    def _bridge_figures(self) -> Iterator[Metric]:
        state, lags = self.state(), self.lags()
        names = ["topic", "partition"]
        families = {
            "log_end": GaugeMetricFamily("sluice_kafka_log_end_offset",
                                         "Offset after the last record of the partition's log", labels=names),
            "next": GaugeMetricFamily("sluice_handed_over_offset",
                                      "Next offset of the partition to hand over (its mark plus one)", labels=names),
            "records": GaugeMetricFamily("sluice_partition_lag_records",
                                         "Records of the partition not yet handed over", labels=names),
            "seconds": GaugeMetricFamily("sluice_partition_lag_seconds",
                                         "Age of the partition's oldest record not yet handed over", labels=names),
        }
        for tp, lag in sorted(lags.items(), key=lambda item: (item[0].topic, item[0].partition)):
            labels = [tp.topic, str(tp.partition)]
            families["log_end"].add_metric(labels, lag.log_end)
            families["next"].add_metric(labels, lag.next_offset)
            families["records"].add_metric(labels, lag.lag_records)
            families["seconds"].add_metric(labels, lag.lag_seconds)
        yield from families.values()
        paused = GaugeMetricFamily("sluice_backpressure_paused",
                                   "1 while this bridge has paused its partitions (too much in flight)")
        paused.add_metric([], 1 if state.paused else 0)
        yield paused
        pauses = CounterMetricFamily("sluice_backpressure_pauses", "Times this bridge paused its partitions")
        pauses.add_metric([], state.pauses)
        yield pauses

    def _pipeline_figures(self) -> Iterator[Metric]:
        p = read_pipeline(self.r)
        own_lag = max((lag.lag_seconds for lag in self.lags().values()), default=0.0)
        unfetchable = max(p.oldest_unfetchable_age, own_lag)

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc)
            family.add_metric([], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            return family

        up = GaugeMetricFamily("sluice_redis_up", "1 if the last scrape could read Redis")
        up.add_metric([], 1)
        yield up
        yield gauge("sluice_oldest_unfetchable_age_seconds",
                    "Age of the oldest record not yet compressed into the spool (not yet fetchable)", unfetchable)
        yield gauge("sluice_oldest_unarchived_age_seconds",
                    "Age of the oldest record not yet uploaded to the store", max(unfetchable, p.oldest_unarchived_age))
        waiting = GaugeMetricFamily("sluice_queue_waiting_tasks",
                                    "Tasks waiting in a Celery queue (what KEDA's redis trigger reads)",
                                    labels=["queue"])
        unacked = GaugeMetricFamily("sluice_queue_unacked_tasks",
                                    "Tasks of a Celery queue that a worker has taken and not finished",
                                    labels=["queue"])
        for queue, count in p.queue_waiting.items():
            waiting.add_metric([queue], count)
        for queue, count in p.queue_unacked.items():
            unacked.add_metric([queue], count)
        yield waiting
        yield unacked
        yield gauge("sluice_inflight_batches", "Batches handed over and not yet wholly compressed",
                    p.inflight_batches)
        yield gauge("sluice_inflight_bytes", "Bytes of the batches in flight (the backpressure bound's measure)",
                    p.inflight_bytes)
        files = GaugeMetricFamily("sluice_slot_files", "Slot files in the spool", labels=["state"])
        files.add_metric(["open"], p.open_files)
        files.add_metric(["sealed"], p.sealed_files)
        yield files
        sizes = GaugeMetricFamily("sluice_slot_file_bytes", "Committed bytes of the slot files", labels=["state"])
        sizes.add_metric(["open"], p.open_bytes)
        sizes.add_metric(["sealed"], p.sealed_bytes)
        yield sizes
        space = spool_space(self.settings.spool_dir)
        if space is not None:
            yield gauge("sluice_spool_used_bytes", "Bytes used on the spool's file system", space.used)
            yield gauge("sluice_spool_free_bytes", "Bytes free on the spool's file system", space.free)
        yield counter("sluice_records_handed_over", "Records handed over by the bridges", p.handed_over)
        yield counter("sluice_records_archived", "Records uploaded to the store", sum(p.archived_records.values()))
        quarantined = CounterMetricFamily("sluice_records_quarantined", "Records sent to quarantine",
                                          labels=["reason"])
        for reason, count in sorted({**dict.fromkeys(QUARANTINE_REASONS, 0), **p.quarantined}.items()):
            quarantined.add_metric([reason], count)
        yield quarantined
        uploads = CounterMetricFamily("sluice_uploads", "Sealed-file uploads by result", labels=["result"])
        uploads.add_metric(["ok"], p.counter(Counter.UPLOADS_OK))
        uploads.add_metric(["failed"], p.counter(Counter.UPLOADS_FAILED))
        yield uploads
        yield counter("sluice_uploaded_bytes", "Bytes uploaded to the store", p.counter(Counter.UPLOADED_BYTES))
        yield counter("sluice_redrives", "Batches redriven after their tasks were lost", p.counter(Counter.REDRIVES))
        repairs = CounterMetricFamily("sluice_redis_repairs", "Repairs of Redis's state from the spool, by what "
                                      "they found: clean (a restart that lost nothing), behind, empty", labels=["kind"])
        for kind in schema.REPAIR_KINDS:
            repairs.add_metric([kind], float(p.repairs.get(f"repairs_{kind}", 0)))
        yield repairs
        yield counter("sluice_redis_repair_set_aside", "Spool files the repairs could not account for, moved to "
                      "set-aside/", float(p.repairs.get("set_aside_total", 0)))
        if "last_at" in p.repairs:
            yield gauge("sluice_redis_last_repair_timestamp_seconds", "When Redis's state was last repaired",
                        float(p.repairs["last_at"]))
        if Counter.LAST_UPLOAD.value in p.counters:
            yield gauge("sluice_last_upload_timestamp_seconds", "When a sealed file was last archived",
                        p.counter(Counter.LAST_UPLOAD))
        k = self.settings.metrics_top_apps
        app_records = CounterMetricFamily("sluice_app_archived_records",
                                          f"Records archived per app: the top {k} by bytes, the rest as _other",
                                          labels=["app"])
        app_bytes = CounterMetricFamily("sluice_app_archived_bytes",
                                        f"Compressed bytes archived per app: the top {k}, the rest as _other",
                                        labels=["app"])
        for app, count in top_apps(p.archived_records, k, by=p.archived_bytes).items():
            app_records.add_metric([app], count)
        for app, count in top_apps(p.archived_bytes, k).items():
            app_bytes.add_metric([app], count)
        yield app_records
        yield app_bytes


def serve(settings: Settings, collector: Collector) -> None:
    """Serve the metrics on SLUICE_METRICS_PORT (all interfaces); MetricsPortInUse if taken."""
    registry = CollectorRegistry()
    registry.register(collector)
    try:
        start_http_server(settings.metrics_port, registry=registry)
    except OSError as exc:
        raise MetricsPortInUse(f"cannot serve metrics on port {settings.metrics_port} ({exc.strerror}): "
                               "set SLUICE_METRICS_PORT to a free port, or 0 for none") from None
