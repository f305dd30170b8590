"""docker-compose.yml describes the real topology, and docker-compose accepts it."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import yaml

from devstack.local import PROJECT_ROOT

SLUICE_SERVICES = {"io-worker", "cpu-worker", "beat", "bridge", "flower"}


@pytest.fixture(scope="module")
def config() -> dict:
    binary = shutil.which("docker-compose")
    if binary is None:
        pytest.fail("docker-compose is not installed; scripts/setup.sh --test installs it")
    out = subprocess.run([binary, "-f", str(PROJECT_ROOT / "docker-compose.yml"), "config"],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "FLOWER_BASIC_AUTH": "admin:not-a-real-password"})
    return yaml.safe_load(out.stdout)


def test_every_role_is_a_service(config):
    assert {"kafka", "kafka-init", "redis"} | SLUICE_SERVICES <= set(config["services"])
    assert config["services"]["kafka"]["image"].startswith("apache/kafka")
    assert config["services"]["kafka"]["environment"]["KAFKA_PROCESS_ROLES"] == "broker,controller"


def test_workers_use_their_queue_and_pool(config):
    io = " ".join(config["services"]["io-worker"]["command"])
    cpu = " ".join(config["services"]["cpu-worker"]["command"])
    assert "celery -A tasks worker -Q io -P threads" in io
    assert "celery -A tasks worker -Q cpu -P prefork" in cpu
    assert config["services"]["bridge"]["command"] == ["python", "-m", "bridge"]


def test_sluice_services_share_the_spool_and_redis(config):
    for name in SLUICE_SERVICES:
        service = config["services"][name]
        assert any(str(v).startswith("spool:/spool") or (isinstance(v, dict) and v.get("target") == "/spool")
                   for v in service["volumes"]), name
        assert service["environment"]["SLUICE_REDIS_URL"] == "redis://redis:6379/0"
        assert service["environment"]["SLUICE_SPOOL_DIR"] == "/spool"
    redis_cmd = " ".join(config["services"]["redis"]["command"])
    assert "--appendonly yes" in redis_cmd and "--appendfsync everysec" in redis_cmd


def test_flower_needs_a_password_and_listens_on_this_machine_only(config):
    flower = config["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"] == "admin:not-a-real-password"
    assert all(str(p.get("host_ip", "") if isinstance(p, dict) else p).startswith("127.0.0.1")
               for p in flower["ports"]), flower["ports"]
    env = {k: v for k, v in os.environ.items() if k != "FLOWER_BASIC_AUTH"}
    refused = subprocess.run([shutil.which("docker-compose") or "docker-compose", "-f",
                              str(PROJECT_ROOT / "docker-compose.yml"), "config"],
                             capture_output=True, text=True, env=env)
    assert refused.returncode != 0 and "FLOWER_BASIC_AUTH" in refused.stderr
