"""The whole pipeline on real Redis, a real Kafka-protocol broker and real Celery workers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import redis

from devstack import sample
from devstack.local import free_port, start_pipeline, wait_until
from sluice.core import schema
from sluice.formats.frames import GATHERED_MAGIC
from tests.integration.conftest import assert_exactly_once, wait_archived

# One pipeline for the whole module, so its tests run in one test process.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_pipeline")]

RECORDS = 50_000
APPS = sample.app_names(24)
SPAN = 3 * 3600.0
TAIL_BYTES = 8192


# Every key under sluice's prefix that Redis held at some moment of the run (sampled) or after it.
SEEN_KEYS: set[str] = set()


def sample_keys(r: redis.Redis, stop: threading.Event) -> None:
    while not stop.wait(0.02):
        SEEN_KEYS.update(k.decode() for k in r.scan_iter(f"{schema.PREFIX}*", count=1000))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    # Zipf volumes and a small tail threshold: busy apps' pieces get files of their own, quiet
    # apps' share tail files (sluice.archive.tail), so both paths run.
    stack = start_pipeline(tmp_path_factory.mktemp("pipeline"), cpu_workers=1, SLUICE_TAIL_PIECE_BYTES=str(TAIL_BYTES))
    start = time.time() - SPAN
    generated = list(sample.lines(RECORDS, APPS, start, SPAN, seed=11, weights=sample.zipf_weights(len(APPS))))
    r = redis.Redis.from_url(stack.redis_url)
    stop = threading.Event()
    sampler = threading.Thread(target=sample_keys, args=(r, stop), daemon=True)
    sampler.start()
    try:
        sample.produce(stack.bootstrap, "logs", (value for _, value in generated))
        wait_archived(stack, RECORDS)
        stop.set()
        sampler.join()
        SEEN_KEYS.update(k.decode() for k in r.scan_iter(f"{schema.PREFIX}*"))
        yield stack, [json.loads(v) for _, v in generated]
    finally:
        stop.set()
        stack.close()


def test_every_key_in_redis_is_one_the_schema_defines(pipeline):
    kinds = {key.removeprefix(schema.PREFIX).split(":")[0] for key in SEEN_KEYS}
    assert {"hwm", "inflight", "b", "slot", "lock", "sealed", "slots", "stats"} <= kinds, \
        "the sampling saw the pipeline at work"
    strangers = sorted(key for key in SEEN_KEYS if not schema.is_schema_key(key))
    assert not strangers, f"keys outside sluice.core.schema: {strangers[:10]}"


def test_every_record_archived_once_in_its_app_and_hour(pipeline):
    stack, docs = pipeline
    per_partition = assert_exactly_once(stack.workdir / "archive", {d["seq"] for d in docs})
    assert len({app for app, _ in per_partition}) == len(APPS)
    # Spool holds nothing once everything is uploaded.
    assert not list((stack.workdir / "spool").rglob("*.zst"))


def test_few_objects_per_app_hour_each_a_valid_zstd_file(pipeline):
    stack, _ = pipeline
    objects = list((stack.workdir / "archive").rglob("*.jsonl.zst"))
    per_hour_dir: dict[Path, int] = {}
    for obj in objects:
        per_hour_dir[obj.parent] = per_hour_dir.get(obj.parent, 0) + 1
    assert max(per_hour_dir.values()) <= 10
    listing = subprocess.run(["zstd", "-lv", *map(str, objects)], capture_output=True, text=True, check=True)
    frames = dict(zip(objects, (int(n) for n in re.findall(r"# Zstandard Frames: (\d+)", listing.stdout))))
    assert len(frames) == len(objects)
    gathered = [obj for obj in objects if obj.read_bytes()[:4] == GATHERED_MAGIC.to_bytes(4, "little")]
    assert gathered, "quiet apps' pieces were gathered from tail files"
    assert all(frames[obj] == 1 for obj in gathered), "one frame of an app's lines per tail archive"
    assert max(frames.values()) > 1, "batches of a busy app-hour are appended as separate frames"
    subprocess.run(["zstd", "-tq", *map(str, objects)], check=True)


def test_fetch_prints_one_apps_records_in_a_window(pipeline):
    stack, docs = pipeline
    app = APPS[2]
    since = min(d["ts"] for d in docs) + 1800
    until = since + 3600
    expected = {d["seq"] for d in docs if d["app"] == app and since <= d["ts"] < until}
    env = stack.env()
    result = subprocess.run(
        [sys.executable, "-m", "sluice.cli", "fetch", "--app", app, "--since", str(since), "--until", str(until)],
        env=env, capture_output=True, check=True)
    got = [json.loads(line) for line in result.stdout.splitlines()]
    assert {d["app"] for d in got} == {app}
    assert sorted(d["seq"] for d in got) == sorted(expected)
    assert f"{len(expected)} records" in result.stderr.decode()

    grep = subprocess.run(
        [sys.executable, "-m", "sluice.cli", "fetch", "--app", app, "--since", str(since),
         "--until", str(until), "--grep", '"level":"ERROR"'],
        env=env, capture_output=True, check=True)
    errors = [json.loads(line) for line in grep.stdout.splitlines()]
    assert errors and all(d["level"] == "ERROR" for d in errors)
    assert {d["seq"] for d in errors} == {d["seq"] for d in docs if d["seq"] in expected and d["level"] == "ERROR"}


def test_fetch_rejects_a_bad_app_id_clearly(pipeline):
    stack, _ = pipeline
    result = subprocess.run([sys.executable, "-m", "sluice.cli", "fetch", "--app", "../etc", "--since=-1h"],
                            env=stack.env(), capture_output=True, text=True)
    assert result.returncode == 2
    assert "not a valid app id" in result.stderr


def test_flower_shows_both_workers(pipeline):
    stack, _ = pipeline
    port = free_port()
    stack.start_flower(port)

    def workers() -> set[str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/workers?refresh=1", timeout=5) as resp:
                return set(json.load(resp))
        except OSError:
            return set()

    wait_until(lambda: {"io", "cpu0"} <= {w.split("@")[0] for w in workers()}, 60, "Flower to list the workers")
