"""The order tests are handed to the test processes in: the longest modules first.

pytest-xdist hands tests out in collection order, so a long fault test collected last starts
when the other processes have nothing left and the run waits on it alone. Sorting is stable:
the tests of a module (and those sharing a module's pipeline) stay together and in order.
"""

from __future__ import annotations

import pytest

# Modules of integration tests, the longest (in test time per module, `--durations`) first.
LONGEST_FIRST = (
    "test_hosts.py", "test_bad_day.py", "test_faults.py", "test_redis_forgets.py", "test_upgrades.py",
    "test_monitoring.py", "test_scaling.py", "test_topics.py", "test_live_fetch.py", "test_oss_pipeline.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
