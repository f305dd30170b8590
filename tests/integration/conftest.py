"""Fixtures that start real services: redis-server and Tansu on free ports, Celery workers."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import pytest
import redis

from devstack import progress, sample
from devstack.local import LocalStack, start_pipeline, wait_until
from sluice.core import schema, scripts
from sluice.core.settings import Settings


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    """One redis-server for every test that needs Redis alone; each gets it empty."""
    stack = LocalStack(tmp_path_factory.mktemp("redis"))
    try:
        stack.start_redis()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def redis_only(redis_server: LocalStack) -> LocalStack:
    """The shared redis-server, empty but for the mark that its (empty) state was checked against
    the spool (sluice.ops.repair), as a pipeline's first repair leaves it."""
    client = redis.Redis.from_url(redis_server.redis_url)
    client.flushall()
    client.register_script(scripts.MARK_VERIFIED)(keys=[schema.VERIFIED])
    return redis_server


@pytest.fixture
def rds(redis_only: LocalStack) -> redis.Redis:
    return redis.Redis.from_url(redis_only.redis_url)


@pytest.fixture
def settings(redis_only: LocalStack, tmp_path: Path) -> Settings:
    return Settings.load(redis_url=redis_only.redis_url, spool_dir=tmp_path / "spool",
                    store_url=f"file://{tmp_path / 'archive'}", seal_age_seconds=1, seal_open_hour_age_seconds=1,
                    lock_wait_seconds=5)


def paced(values: list[bytes], per_second: float, until: threading.Event | None = None) -> Iterator[bytes]:
    """The values at about `per_second`, so the load goes on while workers come and go; with
    `until`, the last tenth waits for it, so the load outlasts what the test waits for however
    slowly the workers start on a loaded machine."""
    began = time.monotonic()
    held = len(values) * 9 // 10 if until is not None else -1
    for i, value in enumerate(values):
        if until is not None and i == held:
            until.wait(300)
        if i % 500 == 0:
            time.sleep(max(0.0, began + i / per_second - time.monotonic()))
        yield value


class Traffic:
    """Produce sample records in the background while the test injects its fault: as fast as the
    broker takes them, or at about `per_second`."""

    def __init__(self, stack: LocalStack, records: int = 60_000, apps: int = 20,
                 lines: list[bytes] | None = None, per_second: float | None = None) -> None:
        self.values = lines if lines is not None else [
            v for _, v in sample.lines(records, sample.app_names(apps), time.time() - 3600, 3600, seed=3)]
        values = self.values if per_second is None else paced(self.values, per_second)
        self.started = time.monotonic()
        self.thread = threading.Thread(target=sample.produce, args=(stack.bootstrap, "logs", values))
        self.thread.start()

    def finish(self) -> None:
        self.thread.join()

    @property
    def seqs(self) -> set[int]:
        return set(range(len(self.values)))


@pytest.fixture
def stack_factory(tmp_path):
    stacks: list[LocalStack] = []

    def make(cpu_workers: int = 1, io_worker: bool = True, **env: str) -> LocalStack:
        stack = start_pipeline(tmp_path / f"stack{len(stacks)}", cpu_workers=cpu_workers, io_worker=io_worker, **env)
        stacks.append(stack)
        return stack

    yield make
    for stack in stacks:
        stack.close()


def wait_archived(stack: LocalStack, expected: int, timeout: float = 300) -> None:
    """Until `expected` records are compressed and every slot file is uploaded.

    Fails at once, with the log, if any service of the stack died on its own.
    """
    r = redis.Redis.from_url(stack.redis_url)

    def done() -> bool:
        stack.check_alive()
        return progress.settled(r, expected)

    wait_until(done, timeout, f"{expected} records archived", interval=0.25)


def read_archive(root: Path) -> list[tuple[Path, bytes]]:
    """(object path, line) for every line of every object, decompressed by the zstd CLI."""
    out = []
    for obj in sorted(root.rglob("*.jsonl.zst")):
        data = subprocess.run(["zstd", "-dcq", str(obj)], check=True, capture_output=True).stdout
        assert data.endswith(b"\n"), f"{obj} does not end with a newline"
        out += [(obj, line) for line in data.split(b"\n")[:-1]]
    return out


def assert_exactly_once(root: Path, expected_seqs: set[int]) -> dict[tuple[str, str], int]:
    """Every seq archived once, in the object of its own app and event hour."""
    seen: Counter[int] = Counter()
    per_partition: Counter[tuple[str, str]] = Counter()
    from datetime import datetime, timezone

    for obj, line in read_archive(root):
        doc = json.loads(line)
        if "seq" not in doc:
            continue
        seen[doc["seq"]] += 1
        app_dir, dt_dir, hour_dir = obj.parts[-4:-1]
        when = datetime.fromtimestamp(doc["ts"], timezone.utc)
        assert app_dir == f"app={doc['app']}", (obj, doc)
        assert dt_dir == f"dt={when:%Y-%m-%d}" and hour_dir == f"hour={when:%H}", (obj, doc)
        per_partition[(doc["app"], f"{when:%Y%m%d%H}")] += 1
    duplicated = {seq: n for seq, n in seen.items() if n > 1}
    missing = expected_seqs - set(seen)
    assert not duplicated, f"{len(duplicated)} records archived more than once, e.g. {list(duplicated)[:5]}"
    assert not missing, f"{len(missing)} records lost, e.g. {sorted(missing)[:5]}"
    assert set(seen) == expected_seqs
    return dict(per_partition)


def group_pids(leader: int) -> set[int]:
    """The processes of a process group: a prefork worker and its pool."""
    pids = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        if int(fields[2]) == leader:  # the field after the state: the process group
            pids.add(int(stat.parent.name))
    return pids


def flocks_of(pids: set[int]) -> set[int]:
    """Inodes of the files these processes hold a flock() on (/proc/locks): a slot file's kernel lock."""
    held = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if fields[1] == "FLOCK" and int(fields[4]) in pids:  # a waiter's line reads "-> FLOCK ..."
            held.add(int(fields[5].rsplit(":", 1)[1]))
    return held
