"""monitoring/: the Prometheus alert rules pass promtool's checks and fire when they should (promtool
test rules), and the rules and the Grafana dashboard query only metrics the bridge serves."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "monitoring" / "sluice-alerts.yml"
DASHBOARD = ROOT / "monitoring" / "sluice-dashboard.json"

# What bridge/metrics.py serves (counters with the _total Prometheus adds).
METRICS = {
    "sluice_build_info",
    "sluice_kafka_log_end_offset",
    "sluice_handed_over_offset",
    "sluice_partition_lag_records",
    "sluice_partition_lag_seconds",
    "sluice_backpressure_paused",
    "sluice_backpressure_pauses_total",
    "sluice_redis_up",
    "sluice_oldest_unfetchable_age_seconds",
    "sluice_oldest_unarchived_age_seconds",
    "sluice_queue_waiting_tasks",
    "sluice_queue_unacked_tasks",
    "sluice_inflight_batches",
    "sluice_inflight_bytes",
    "sluice_slot_files",
    "sluice_slot_file_bytes",
    "sluice_spool_used_bytes",
    "sluice_spool_free_bytes",
    "sluice_records_handed_over_total",
    "sluice_records_archived_total",
    "sluice_records_quarantined_total",
    "sluice_uploads_total",
    "sluice_uploaded_bytes_total",
    "sluice_redrives_total",
    "sluice_last_upload_timestamp_seconds",
    "sluice_app_archived_records_total",
    "sluice_app_archived_bytes_total",
    "sluice_redis_repairs_total",
    "sluice_redis_repair_set_aside_total",
    "sluice_redis_last_repair_timestamp_seconds",
}
# Prometheus' own series the rules and the dashboard may use besides sluice's.
OTHER_METRICS = {"up"}
ALERTS = {
    "SluiceLagHigh",
    "SluiceUnarchivedTooOld",
    "SluiceUnfetchableTooOld",
    "SluiceUploadsFailing",
    "SluiceUploadsStalled",
    "SluiceQuarantineGrowing",
    "SluiceSpoolNearlyFull",
    "SluiceRedisDown",
    "SluiceBridgeDown",
    "SluiceRedisStateRepaired",
    "SluiceRepairSetFilesAside",
}
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                "group_right"}
# The threshold of an alert: the number after the first comparison of its expr.
THRESHOLD = re.compile(r"(?P<op>==|!=|>=|<=|>|<)\s*(?P<number>\d+(?:\.\d+)?)\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: scripts/setup.sh --test installs Debian's prometheus")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=120)


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def dashboard_exprs() -> list[str]:
    def panels(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [p for item in items for p in [item, *panels(item.get("panels", []))]]

    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in panels(dashboard["panels"]) for t in p.get("targets", [])]


def metric_names(expr: str) -> set[str]:
    """Every metric an expr selects: its identifiers, less functions, keywords, labels and strings."""
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    return set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", bare)) - PROMQL_WORDS


def check_names(where: str, expr: str) -> None:
    sluice = set(re.findall(r"sluice_[a-z_]+", expr))
    assert sluice <= METRICS, f"{where}: unknown sluice metrics {sorted(sluice - METRICS)} in {expr!r}"
    names = metric_names(expr)
    assert sluice <= names, f"{where}: metric_names() missed {sorted(sluice - names)} in {expr!r}"
    unknown = names - METRICS - OTHER_METRICS
    assert not unknown, f"{where}: unknown metrics {sorted(unknown)} in {expr!r}"


def test_the_known_metrics_are_those_the_bridge_serves():
    served: set[str] = set()
    for node in ast.walk(ast.parse((ROOT / "bridge" / "metrics.py").read_text())):
        if isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name, func = node.args[0].value, node.func
            called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if isinstance(name, str) and name.startswith("sluice_"):
                served.add(name + "_total" if called in ("CounterMetricFamily", "counter") else name)
    assert served == METRICS


def test_promtool_checks_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_alerts_are_all_there_and_complete():
    rules = alert_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        name = rule["alert"]
        assert "for" in rule, name
        assert rule.get("labels", {}).get("severity") in ("warning", "critical"), name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), name
        assert THRESHOLD.search(rule["expr"]), f"{name}: no number threshold in {rule['expr']!r}"


def test_the_alerts_query_only_known_metrics():
    for rule in alert_rules():
        check_names(rule["alert"], rule["expr"])


def test_the_dashboard_queries_only_known_metrics():
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        check_names("dashboard", expr)


def test_the_dashboard_is_importable(tmp_path: Path):
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] == "sluice"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["type"] in ("timeseries", "stat"), panel["title"]
        assert panel["targets"], panel["title"]
        for source in [panel["datasource"]] + [t["datasource"] for t in panel["targets"]]:
            assert source == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
    # Every query parses: promtool checks them as recording rules (Grafana's interval as 5m).
    rules = [{"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
             for i, expr in enumerate(dashboard_exprs())]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- promtool test rules --------------------------------------------------------------------------

# The thresholds and durations the cases below are written for: the test rewrites them into a copy
# of the rules file, so tuning monitoring/sluice-alerts.yml does not break it.
PINNED = {
    "SluiceLagHigh": ("300", "5m"),
    "SluiceUnfetchableTooOld": ("120", "2m"),
    "SluiceUploadsStalled": ("1800", "5m"),
    "SluiceSpoolNearlyFull": ("0.10", "5m"),
    "SluiceRedisDown": ("0", "2m"),
    "SluiceBridgeDown": ("0", "2m"),
}


def with_threshold(expr: str, number: str) -> str:
    match = THRESHOLD.search(expr)
    assert match, expr
    return expr[:match.start("number")] + number + expr[match.end("number"):]


def pinned_rules(path: Path) -> Path:
    document = yaml.safe_load(RULES.read_text())
    for group in document["groups"]:
        for rule in group["rules"]:
            if rule.get("alert") in PINNED:
                threshold, duration = PINNED[rule["alert"]]
                rule["expr"] = with_threshold(rule["expr"], threshold)
                rule["for"] = duration
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def annotations(alert: str, values: dict[str, str]) -> dict[str, str]:
    """The alert's annotations as Prometheus renders them, given what each {{ ... }} renders to."""
    rule = next(r for r in alert_rules() if r["alert"] == alert)

    def render(template: str) -> str:
        return re.sub(r"\{\{\s*(.*?)\s*\}\}", lambda m: values[m.group(1)], template)

    return {key: render(text) for key, text in rule["annotations"].items()}


def fires(alert: str, labels: dict[str, str], values: dict[str, str]) -> dict[str, Any]:
    """An alert_rule_test's expected alert: the rule's severity and these labels, its annotations rendered."""
    severity = next(r for r in alert_rules() if r["alert"] == alert)["labels"]["severity"]
    return {"exp_labels": {"severity": severity, **labels}, "exp_annotations": annotations(alert, values)}


def case(alert: str, series: dict[str, str], checks: list[tuple[str, list[dict[str, Any]]]]) -> dict[str, Any]:
    """A promtool test group: input series (one sample a minute) and the alerts expected at given times."""
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [{"eval_time": at, "alertname": alert, "exp_alerts": expected} for at, expected in checks],
    }


# Two bridges: the pipeline-wide figures come from both.
A = 'instance="bridge-a:9464", job="sluice-bridge"'
B = 'instance="bridge-b:9464", job="sluice-bridge"'


def cases() -> list[dict[str, Any]]:
    def unfetchable(a: str, b: str) -> dict[str, str]:
        return {f"sluice_oldest_unfetchable_age_seconds{{{A}}}": a, f"sluice_oldest_unfetchable_age_seconds{{{B}}}": b}

    def spool(used: str, free: str) -> dict[str, str]:
        return {f"sluice_spool_used_bytes{{{A}}}": used, f"sluice_spool_free_bytes{{{A}}}": free}

    def uploads(sealed: str) -> dict[str, str]:
        # The last upload at time 0: time() - it is the evaluation time.
        return {f"sluice_last_upload_timestamp_seconds{{{A}}}": "0x60",
                f'sluice_slot_files{{state="sealed", {A}}}': sealed}

    def lag(topic: str, partition: int, bridge: str) -> str:
        return f'sluice_partition_lag_seconds{{topic="{topic}", partition="{partition}", {bridge}}}'

    return [
        # Above the threshold for longer than `for` (the bridges' figures are combined with max).
        case("SluiceUnfetchableTooOld", unfetchable("300x10", "290x10"), [
            ("1m", []),  # pending
            ("3m", [fires("SluiceUnfetchableTooOld", {}, {"$value | humanizeDuration": "5m 0s"})]),
        ]),
        # Below, at the threshold, or above for less than `for`: silent.
        case("SluiceUnfetchableTooOld", unfetchable("100x10", "120x10"), [("5m", []), ("10m", [])]),
        case("SluiceUnfetchableTooOld", unfetchable("60 300 60x8", "60x10"), [("2m", []), ("3m", []), ("10m", [])]),
        # 5% free fires after `for`; half free is silent.
        case("SluiceSpoolNearlyFull", spool("950000000000x10", "50000000000x10"), [
            ("4m", []),
            ("6m", [fires("SluiceSpoolNearlyFull", {}, {"$value | humanizePercentage": "5%"})]),
        ]),
        case("SluiceSpoolNearlyFull", spool("500000000000x10", "500000000000x10"), [("10m", [])]),
        # Per topic: only the topic with a lagging partition.
        case("SluiceLagHigh", {lag("logs", 0, A): "600x10", lag("logs", 1, B): "5x10", lag("audit", 0, B): "30x10"}, [
            ("4m", []),
            ("6m", [fires("SluiceLagHigh", {"topic": "logs"},
                          {"$value | humanizeDuration": "10m 0s", "$labels.topic": "logs"})]),
        ]),
        # Sealed files waiting and no upload for more than 30 minutes; no sealed files: silent.
        case("SluiceUploadsStalled", uploads("2x60"), [
            ("35m", []),
            ("40m", [fires("SluiceUploadsStalled", {}, {"$value | humanizeDuration": "40m 0s"})]),
        ]),
        case("SluiceUploadsStalled", uploads("0x60"), [("40m", [])]),
        # Records over two hours old not yet archived, for longer than `for`; under the threshold: silent.
        case("SluiceUnarchivedTooOld", {f"sluice_oldest_unarchived_age_seconds{{{A}}}": "8000x20",
                                        f"sluice_oldest_unarchived_age_seconds{{{B}}}": "100x20"}, [
            ("5m", []),
            ("12m", [fires("SluiceUnarchivedTooOld", {}, {"$value | humanizeDuration": "2h 13m 20s"})]),
        ]),
        case("SluiceUnarchivedTooOld", {f"sluice_oldest_unarchived_age_seconds{{{A}}}": "7000x20"}, [("15m", [])]),
        # An upload failing every minute for 15 minutes fires; failures that stopped long ago do not.
        case("SluiceUploadsFailing", {f'sluice_uploads_total{{result="failed", {A}}}': "0+1x40"}, [
            ("10m", []),
            ("20m", [fires("SluiceUploadsFailing", {}, {"$value | humanize": "15"})]),
        ]),
        case("SluiceUploadsFailing", {f'sluice_uploads_total{{result="failed", {A}}}': "3x40"}, [("20m", [])]),
        # The first quarantine of a reason fires at once (its series is served at 0 from the start),
        # counted once although both bridges serve it, and not 15 minutes later.
        case("SluiceQuarantineGrowing", {
            f'sluice_records_quarantined_total{{reason="undecodable", {A}}}': "0 0 7x20",
            f'sluice_records_quarantined_total{{reason="undecodable", {B}}}': "0 0 7x20",
            f'sluice_records_quarantined_total{{reason="empty", {A}}}': "0x20",
        }, [
            ("1m", []),
            ("5m", [fires("SluiceQuarantineGrowing", {}, {"$value | humanize": "7"})]),
            ("20m", []),
        ]),
        # Redis is down only when no bridge can read it.
        case("SluiceRedisDown", {f"sluice_redis_up{{{A}}}": "0x10", f"sluice_redis_up{{{B}}}": "1 1 1 0x7"}, [
            ("3m", []),
            ("6m", [fires("SluiceRedisDown", {}, {})]),
        ]),
        # A repair that found the state behind fires once, whichever bridges serve it; a clean one
        # (a restart that lost nothing) never does; and it stops 15 minutes on.
        case("SluiceRedisStateRepaired", {
            f'sluice_redis_repairs_total{{kind="behind", {A}}}': "0 0 1x25",
            f'sluice_redis_repairs_total{{kind="behind", {B}}}': "0 0 1x25",
            f'sluice_redis_repairs_total{{kind="clean", {A}}}': "0 1 2 3x25",
            f'sluice_redis_repairs_total{{kind="empty", {A}}}': "0x28",
        }, [
            ("1m", []),
            ("5m", [fires("SluiceRedisStateRepaired", {}, {"$value | humanize": "1"})]),
            ("20m", []),
        ]),
        case("SluiceRepairSetFilesAside", {
            f"sluice_redis_repair_set_aside_total{{{A}}}": "0 0 2x20",
        }, [
            ("1m", []),
            ("5m", [fires("SluiceRepairSetFilesAside", {}, {"$value | humanize": "2"})]),
        ]),
        case("SluiceBridgeDown", {f"up{{{A}}}": "1 1 0x8", f"up{{{B}}}": "1x10"}, [
            ("3m", []),
            ("5m", [fires("SluiceBridgeDown", {"instance": "bridge-a:9464", "job": "sluice-bridge"},
                          {"$labels.instance": "bridge-a:9464"})]),
        ]),
    ]


def test_the_alerts_fire_when_they_should(tmp_path: Path):
    rules = pinned_rules(tmp_path / "sluice-alerts.yml")
    tests = tmp_path / "sluice-alerts.test.yml"
    # promtool resolves rule_files relative to the test file: an absolute path.
    tests.write_text(yaml.safe_dump({"rule_files": [str(rules.resolve())], "evaluation_interval": "1m",
                                     "tests": cases()}, sort_keys=False))
    result = promtool("test", "rules", str(tests))
    assert result.returncode == 0, result.stdout + result.stderr
