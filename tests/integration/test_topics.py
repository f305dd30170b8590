"""Several topics: a pattern or a list reads every topic it names, one created mid-run too,
and archives each record exactly once (archives are per app; the topic is in batch ids and the
quarantine envelope)."""

from __future__ import annotations

import json
import time

import pytest
import redis

from devstack import sample
from devstack.local import wait_until
from devstack.progress import handed_over
from tests.integration.conftest import assert_exactly_once, read_archive, wait_archived

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("topics", ["re:app-logs-.*", "app-logs-a,app-logs-b,app-logs-c"], ids=["pattern", "list"])
def test_two_topics_and_a_third_created_mid_run_are_each_archived_exactly_once(stack_factory, topics: str):
    """The third topic matches the pattern, or is listed, before it exists."""
    stack = stack_factory(SLUICE_TOPIC=topics, SLUICE_TOPIC_REFRESH_SECONDS="2")
    for topic in ("app-logs-a", "app-logs-b", "other-logs"):
        stack.create_topic(topic, 2)
    values = [v for _, v in sample.lines(30_000, sample.app_names(8), time.time() - 600, 600, seed=31)]
    first, second, third = values[0::3], values[1::3], values[2::3]
    sample.produce(stack.bootstrap, "app-logs-a", first + [b"bad from a"])
    sample.produce(stack.bootstrap, "app-logs-b", second)
    sample.produce(stack.bootstrap, "other-logs", [b'{"app": "nope", "ts": 1}'] * 100)  # does not match
    r = redis.Redis.from_url(stack.redis_url)
    wait_until(lambda: handed_over(r) >= len(first) + len(second) + 1, 120, "the first two topics handed over")
    stack.create_topic("app-logs-c", 3)  # created mid-run: picked up without a restart
    sample.produce(stack.bootstrap, "app-logs-c", third)
    wait_archived(stack, len(values) + 1)
    assert_exactly_once(stack.workdir / "archive", set(range(len(values))))
    [envelope] = [json.loads(line) for _, line in read_archive(stack.workdir / "archive" / "app=_quarantine")]
    assert envelope["topic"] == "app-logs-a" and envelope["reason"] == "undecodable"
    assert not (stack.workdir / "archive" / "app=nope").exists()
    assert handed_over(r) == len(values) + 1
