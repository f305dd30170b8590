"""Operating sluice: a real Prometheus scrapes a running stack and evaluates the shipped alert
rules; `sluice status` and `sluice ledger` against real Redis; bad settings and a taken metrics
port stop a process at start-up with one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest
import redis
import yaml

from devstack import sample
from devstack.local import PROJECT_ROOT, LocalStack, free_port, port_open, wait_until
from sluice.core import schema
from sluice.formats.records import QUARANTINE_APP, valid_app_id
from sluice.handover.batches import Batches
from sluice.handover.marks import Marks
from sluice.ops.monitoring import OTHER_APPS
from tests.integration.conftest import Traffic, assert_exactly_once, wait_archived

pytestmark = pytest.mark.integration

RULES = PROJECT_ROOT / "monitoring" / "sluice-alerts.yml"
SECRET_MARK = "oss-secret-that-must-never-be-served"


def rules_with(path: Path, alert: str, threshold: float, hold: str) -> Path:
    """The shipped rules, with one alert's threshold and `for` changed (a test cannot wait
    minutes); everything else as shipped."""
    doc = yaml.safe_load(RULES.read_text())
    [rule] = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == alert]
    rule["expr"], n = re.subn(r">\s*[0-9.]+(\s*)$", rf"> {threshold}\1", rule["expr"].rstrip())
    assert n == 1, f"no threshold found in {alert}'s expression"
    rule["for"] = hold
    path.write_text(yaml.safe_dump(doc))
    return path


class Prometheus:
    """Debian's prometheus server, scraping the given targets every second."""

    def __init__(self, workdir: Path, targets: list[str], rules: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("prometheus is not installed; scripts/setup.sh --test installs Debian's prometheus")
        self.port = free_port()
        config = workdir / "prometheus.yml"
        config.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rules)],
            "scrape_configs": [{"job_name": "sluice-bridge", "static_configs": [{"targets": targets}]}],
        }))
        self.log = open(workdir / "prometheus.log", "wb")
        self.proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                                      f"--web.listen-address=127.0.0.1:{self.port}"],
                                     stdout=self.log, stderr=subprocess.STDOUT)
        wait_until(lambda: port_open(self.port), 30, "Prometheus to listen")

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=5) as reply:
            return json.load(reply)["data"]

    def firing(self, alert: str) -> bool:
        return any(a["labels"]["alertname"] == alert and a["state"] == "firing" for a in self.api("alerts")["alerts"])

    def value(self, query: str) -> float | None:
        result = self.api("query", query=query)["result"]
        return float(result[0]["value"][1]) if result else None

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


@pytest.fixture
def prometheus_for(tmp_path: Path) -> Iterator[Any]:
    servers: list[Prometheus] = []

    def start(targets: list[str], rules: Path) -> Prometheus:
        servers.append(Prometheus(tmp_path, targets, rules))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def test_prometheus_fires_the_unfetchable_alert_while_the_cpu_worker_is_down_and_resolves_it(
        stack_factory, prometheus_for, tmp_path):
    stack = stack_factory(SLUICE_OSS_ACCESS_KEY_SECRET=SECRET_MARK)
    rules = rules_with(tmp_path / "rules.yml", "SluiceUnfetchableTooOld", 5, "2s")
    prom = prometheus_for([f"127.0.0.1:{stack.metrics_ports['bridge']}"], rules)
    bad = [b"not json %d" % i for i in range(7)]
    stack.kill("cpu0")
    good = [v for _, v in sample.lines(20_000, sample.app_names(10), time.time() - 600, 600, seed=21)]
    traffic = Traffic(stack, lines=good + bad)
    traffic.finish()
    wait_until(lambda: prom.firing("SluiceUnfetchableTooOld"), 90, "the alert to fire", interval=0.5)
    assert prom.value("max(sluice_inflight_batches)") > 0
    stack.start_cpu_worker(name="cpu1")
    wait_archived(stack, len(good) + len(bad))
    wait_until(lambda: not prom.firing("SluiceUnfetchableTooOld"), 60, "the alert to resolve", interval=0.5)
    # A scrape a second: the next one sees all archived.
    wait_until(lambda: prom.value("max(sluice_records_archived_total)") == len(good) + len(bad), 30,
               "Prometheus to see every record archived")
    assert prom.value("sum(sluice_records_quarantined_total)") == len(bad)
    assert prom.value('sum(sluice_records_quarantined_total{reason="undecodable"})') == len(bad)
    assert prom.value("sum(sluice_partition_lag_records)") == 0
    assert_exactly_once(stack.workdir / "archive", set(range(len(good))))
    served = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports['bridge']}/metrics", timeout=10).read()
    assert SECRET_MARK.encode() not in served and b"redis://" not in served, "no secret or URL is served"
    apps = {app.decode() for app in re.findall(rb'sluice_app_archived_records_total\{app="([^"]*)"\}', served)}
    assert apps and all(app in (OTHER_APPS, QUARANTINE_APP) or valid_app_id(app) for app in apps), apps


def scrape(port: int) -> dict[str, float]:
    """A bridge's /metrics as {series: value}."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {series: float(value) for series, value in
            (line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))}


def test_two_bridges_count_nothing_twice(stack_factory):
    """The way of combining targets of docs/operating.md ("Monitoring") holds with two bridges: each
    partition's series comes from the one bridge that holds it (so sum() over targets is the total
    lag), and the pipeline-wide figures read from Redis are the same on both (so max() is the figure)."""
    stack = stack_factory()
    stack.start_bridge(name="bridge2")
    ports = [stack.metrics_ports["bridge"], stack.metrics_ports["bridge2"]]

    def partitions(port: int) -> set[str]:
        return {series for series in scrape(port) if series.startswith("sluice_partition_lag_records{")}

    def split_between_both() -> bool:
        try:
            first, second = partitions(ports[0]), partitions(ports[1])
        except OSError:  # bridge2 is still starting: its metrics server is not listening yet
            return False
        return bool(first) and bool(second) and not first & second and len(first | second) == 4
    wait_until(split_between_both, 90, "the four partitions split between the two bridges", interval=0.5)
    values = [v for _, v in sample.lines(4_000, sample.app_names(4), time.time() - 600, 600, seed=24)]
    sample.produce(stack.bootstrap, "logs", values)
    wait_archived(stack, len(values))

    def handed(metrics: dict[str, float]) -> float:
        return sum(value for series, value in metrics.items() if series.startswith("sluice_handed_over_offset{"))

    def agree() -> bool:
        """Every record archived, on both; the partitions' next offsets (refreshed every few
        seconds), summed over both bridges, are what was handed over."""
        a, b = scrape(ports[0]), scrape(ports[1])
        return (a["sluice_records_archived_total"] == b["sluice_records_archived_total"] == len(values)
                and a["sluice_records_handed_over_total"] == b["sluice_records_handed_over_total"] == len(values)
                and handed(a) + handed(b) == len(values))
    wait_until(agree, 30, "both bridges to agree on what was handed over and archived", interval=0.5)
    assert split_between_both()


def run_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sluice.cli", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_status_says_what_runs_and_exits_by_its_thresholds(stack_factory):
    # No tail pieces: each app's records count under its own name however small the batches are
    # cut (the small pieces of a tail count as the pseudo-app ~tail).
    stack = stack_factory(SLUICE_TAIL_PIECE_BYTES="0")
    values = [v for _, v in sample.lines(5_000, sample.app_names(5), time.time() - 600, 600, seed=22)]
    sample.produce(stack.bootstrap, "logs", values + [b"not json"])
    wait_archived(stack, len(values) + 1)
    env = stack.env()
    healthy = run_cli(env, "status", "--max-lag-seconds", "600", "--max-unarchived-age", "600", "--min-workers", "2")
    assert healthy.returncode == 0, healthy.stdout + healthy.stderr
    assert healthy.stdout.startswith("healthy") and "lag logs" in healthy.stdout and "app-000" in healthy.stdout
    unhealthy = run_cli(env, "status", "--json", "--min-workers", "5")
    assert unhealthy.returncode == 1
    doc = json.loads(unhealthy.stdout)
    assert doc["healthy"] is False and doc["problems"] == ["2 workers answered < 5"]
    assert doc["topics"]["logs"]["lag_records"] == 0 and len(doc["topics"]["logs"]["partitions"]) == 4
    assert doc["records_archived"] == doc["records_handed_over"] == len(values) + 1
    assert doc["quarantined"] == {"undecodable": 1} and doc["sealed_files"] == 0
    assert sum(doc["top_apps_last_hour"].values()) == len(values) + 1


def test_status_reads_a_real_lag_in_records_and_seconds_and_exits_1_past_its_thresholds(stack_factory):
    """With the bridge down, what waits in Kafka is lag: as many records as were produced, as old
    as the oldest of them (its Kafka timestamp), read from the broker itself."""
    stack = stack_factory()
    stack.kill("bridge")
    values = [v for _, v in sample.lines(300, sample.app_names(3), time.time() - 60, 60, seed=23)]
    before_produce = time.time()
    sample.produce(stack.bootstrap, "logs", values)
    lagging = run_cli(stack.env(), "status", "--json", "--no-workers", "--max-lag-records", "10",
                      "--max-lag-seconds", "3600")
    after_status = time.time()
    assert lagging.returncode == 1, lagging.stdout + lagging.stderr
    doc = json.loads(lagging.stdout)
    lag = doc["topics"]["logs"]
    assert lag["lag_records"] == len(values)
    # the oldest record's timestamp was taken between before_produce and after_produce
    assert 0 < lag["lag_seconds"] <= after_status - before_produce + 1, (lag, after_status - before_produce)
    assert any("lag" in problem and "records" in problem for problem in doc["problems"]), doc["problems"]
    aged = run_cli(stack.env(), "status", "--json", "--no-workers", "--max-lag-seconds", "0")
    assert aged.returncode == 1 and any("lag" in p and "s >" in p for p in json.loads(aged.stdout)["problems"])


def test_status_and_ledger_without_redis_say_so_in_one_line():
    env = {**os.environ, "SLUICE_REDIS_URL": "redis://127.0.0.1:1/0"}
    for args in (["status", "--no-workers"], ["ledger", "show"], ["ledger", "reset", "--topic", "logs", "--yes"]):
        result = run_cli(env, *args)
        assert result.returncode == 2, args
        assert result.stderr.count("\n") == 1 and "Redis is not reachable" in result.stderr, result.stderr


def test_ledger_reset_says_what_it_would_do_and_does_it_only_with_yes(redis_only: LocalStack, settings):
    r = redis.Redis.from_url(redis_only.redis_url)
    batches = Batches(r, settings.replace(**{"claim_check": "redis"}))
    for partition, last in ((0, 99), (1, 49)):
        bid = schema.batch_id("logs", partition, 0, last)
        assert batches.hand_over(bid, "logs", partition, None, last, [b"x"], "ts:fp")
    env = {**os.environ, "SLUICE_REDIS_URL": redis_only.redis_url}
    shown = run_cli(env, "ledger", "show", "--topic", "logs")
    assert shown.returncode == 0 and len(shown.stdout.splitlines()) == 3 and "99" in shown.stdout
    dry = run_cli(env, "ledger", "reset", "--topic", "logs", "--partition", "0")
    assert dry.returncode == 0 and "Nothing changed" in dry.stdout
    marks = Marks(r)
    assert marks.high_water_mark("logs", 0) == 99
    done = run_cli(env, "ledger", "reset", "--topic", "logs", "--partition", "0", "--yes")
    assert done.returncode == 0, done.stderr
    assert marks.high_water_mark("logs", 0) is None and marks.mark("logs", 0).incarnation == 1
    assert marks.earlier("logs", 0) == 100 and marks.high_water_mark("logs", 1) == 49
    missing = run_cli(env, "ledger", "reset", "--topic", "nope", "--yes")
    assert missing.returncode == 1 and "no mark of nope" in missing.stderr


def start_bridge_alone(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "bridge"], env={**os.environ, **env}, capture_output=True,
                          text=True, timeout=60, cwd=PROJECT_ROOT)


def test_a_metrics_port_in_use_stops_the_bridge_at_start_up():
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = start_bridge_alone({"SLUICE_METRICS_PORT": str(port), "SLUICE_REDIS_URL": "redis://127.0.0.1:1/0",
                                     "SLUICE_KAFKA_BOOTSTRAP": "127.0.0.1:1"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and f"port {port}" in result.stderr, result.stderr


@pytest.mark.parametrize("topic, why", [("re:logs-(", "does not compile"), ("logs,,audit", "empty name")])
def test_a_bad_topic_setting_stops_every_process_at_start_up_in_one_line(topic, why):
    bridge = start_bridge_alone({"SLUICE_TOPIC": topic, "SLUICE_METRICS_PORT": "0"})
    worker = subprocess.run([sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "io"],
                            env={**os.environ, "SLUICE_TOPIC": topic}, capture_output=True, text=True, timeout=60,
                            cwd=PROJECT_ROOT)
    cli = run_cli({**os.environ, "SLUICE_TOPIC": topic}, "status")
    for result in (bridge, worker, cli):
        assert result.returncode != 0
        assert result.stderr.strip().count("\n") == 0 and "SLUICE_TOPIC" in result.stderr and why in result.stderr, \
            result.stderr
