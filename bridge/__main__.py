"""`python -m bridge`: run one bridge until SIGTERM/SIGINT, then flush and commit.

Wrong settings, a metrics port in use or a Redis schema of another major version stop it at
start-up with one line on stderr and exit status 2, before it joins the consumer group."""

from __future__ import annotations

import gc
import logging
import signal
import sys
import threading

import redis

from bridge.consumer import Bridge
from bridge.metrics import LagWatcher, MetricsPortInUse, PipelineCollector, serve
from sluice.core.protocol import SchemaMismatch, check_schema, check_schema_once_reachable
from sluice.core.redis_client import get_redis
from sluice.core.settings import SettingsError, get_settings


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    try:
        settings = get_settings()
        bridge = Bridge(settings)  # touches nothing yet
        if settings.metrics_port:
            watcher = LagWatcher(settings, get_redis(), bridge.state)
            serve(settings, PipelineCollector(settings, get_redis(), bridge.state, lambda: watcher.lags))
        try:
            check_schema(get_redis())
        except redis.RedisError:
            check_schema_once_reachable(get_redis(), "bridge")  # the hand-over waits out the outage
        if settings.metrics_port:
            watcher.start()
    except (SettingsError, MetricsPortInUse, SchemaMismatch) as exc:
        print(f"sluice bridge: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    # Everything imported so far lives as long as the process: out of the cyclic collector's
    # sight, its full collections no longer walk it.
    gc.freeze()
    bridge.run(stop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
