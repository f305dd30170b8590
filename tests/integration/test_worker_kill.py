"""SIGKILL a compress worker while it works: every record still ends up archived exactly once."""

from __future__ import annotations

import threading
import time

import pytest
import redis

from sluice import sample
from sluice.local import wait_until
from tests.integration.conftest import assert_exactly_once, start_pipeline, wait_archived

pytestmark = pytest.mark.integration

RECORDS = 60_000


def test_sigkill_of_cpu_worker_mid_run_loses_and_duplicates_nothing(tmp_path):
    # Level 19 makes compression slow enough that the kill lands while frames are being
    # built and appended.
    stack = start_pipeline(tmp_path / "stack", cpu_workers=1, SLUICE_ZSTD_LEVEL="19")
    try:
        r = redis.Redis.from_url(stack.redis_url)
        docs = list(sample.lines(RECORDS, sample.app_names(20), time.time() - 3600, 3600, seed=5))
        producer = threading.Thread(target=sample.produce,
                                    args=(stack.bootstrap, "logs", [v for _, v in docs]))
        producer.start()

        def compressed() -> int:
            return sum(int(v) for v in r.hvals("sluice:stats:records"))

        # Mid-run: some pieces done, and the cpu worker holds unacknowledged tasks right now.
        wait_until(lambda: compressed() > RECORDS * 0.05 and r.hlen("unacked") > 0, 120,
                   "compression under way")
        cpu = next(s for s in stack.services if s.name == "cpu0")
        cpu.kill()
        at_kill = compressed()
        assert at_kill < RECORDS, "the kill came too late to test anything"
        stack.services.remove(cpu)
        producer.join()
        stack.start_cpu_worker(name="cpu1")
        wait_archived(stack, RECORDS, timeout=400)
        assert_exactly_once(stack.workdir / "archive", set(range(RECORDS)))
    finally:
        stack.close()
