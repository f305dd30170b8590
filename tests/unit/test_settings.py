"""Unit tests for sluice.core.settings: environment reading, validation, secret hiding."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from sluice.core.settings import Secret, Settings

REDIS_URL = "redis://:s3cret-pw@redis.internal:6379/0"
OSS_ID = "LTAIkeyid-XYZ123"
OSS_SECRET = "oss-Secret-Value-987"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith("SLUICE_"):
            monkeypatch.delenv(name)


def test_defaults():
    s = Settings.load()
    assert s.topic == "logs"
    assert s.app_id_source == "json:app"
    assert s.store_url == "file://data/archive"
    assert s.claim_check == "spool"
    assert s.slots_per_app == 10
    assert s.lock_lease_seconds > s.compress_time_limit


def test_reads_prefixed_env(monkeypatch):
    monkeypatch.setenv("SLUICE_TOPIC", "mixed-logs")
    monkeypatch.setenv("SLUICE_KAFKA_BOOTSTRAP", "k1:9092,k2:9092")
    monkeypatch.setenv("SLUICE_SLOTS_PER_APP", "7")
    monkeypatch.setenv("SLUICE_BATCH_MAX_SECONDS", "2.5")
    monkeypatch.setenv("SLUICE_SPOOL_DIR", "/mnt/nas/spool")
    monkeypatch.setenv("SLUICE_APP_ID_SOURCE", "header:x-app")
    monkeypatch.setenv("SLUICE_TIMESTAMP_FIELD", "")
    monkeypatch.setenv("SLUICE_CLAIM_CHECK", "spool")
    monkeypatch.setenv("SLUICE_STORE_URL", "oss://bucket/prefix")
    monkeypatch.setenv("SLUICE_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("SLUICE_OSS_ACCESS_KEY_SECRET", OSS_SECRET)
    monkeypatch.setenv("SLUICE_OSS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("SLUICE_OSS_ENDPOINT", "https://oss-cn-hangzhou.aliyuncs.com")
    s = Settings.load()
    assert s.topic == "mixed-logs"
    assert s.kafka_bootstrap == "k1:9092,k2:9092"
    assert s.slots_per_app == 7
    assert s.batch_max_seconds == 2.5
    assert s.spool_dir == Path("/mnt/nas/spool")
    assert s.app_id_source == "header:x-app"
    assert s.timestamp_field == ""
    assert s.claim_check == "spool"
    assert s.store_url == "oss://bucket/prefix"
    assert isinstance(s.redis_url, Secret) and s.redis_url.get_secret_value() == REDIS_URL
    assert s.oss_access_key_secret.get_secret_value() == OSS_SECRET


def test_unprefixed_env_ignored(monkeypatch):
    monkeypatch.setenv("TOPIC", "nope")
    monkeypatch.setenv("REDIS_URL", "redis://other:1/0")
    s = Settings.load()
    assert s.topic == "logs"
    assert s.redis_url.get_secret_value() == "redis://127.0.0.1:6379/0"


def test_init_arguments_override_env(monkeypatch):
    monkeypatch.setenv("SLUICE_TOPIC", "from-env")
    assert Settings.load(topic="from-arg").topic == "from-arg"


def test_bad_env_value_is_rejected(monkeypatch):
    monkeypatch.setenv("SLUICE_SLOTS_PER_APP", "0")
    with pytest.raises(ValueError, match="SLUICE_SLOTS_PER_APP"):
        Settings.load()


# --------------------------------------------------------------------------- app_id_source


@pytest.mark.parametrize("source", ["json:app", "json:service.name", "key", "key:ignored",
                                    "header:x-app", r"regex:app=(\S+)"])
def test_app_id_source_accepted(source):
    assert Settings.load(app_id_source=source).app_id_source == source


@pytest.mark.parametrize("source", ["yaml:app", "JSON:app", "keys", "", ":app", "headers:x"])
def test_app_id_source_bad_kind(source):
    with pytest.raises(ValueError, match="app_id_source must start with one of"):
        Settings.load(app_id_source=source)


@pytest.mark.parametrize("source", ["json:", "header:", "regex:", "json"])
def test_app_id_source_missing_argument(source):
    with pytest.raises(ValueError, match="needs an argument"):
        Settings.load(app_id_source=source)


def test_app_id_source_bad_kind_from_env(monkeypatch):
    monkeypatch.setenv("SLUICE_APP_ID_SOURCE", "yaml:app")
    with pytest.raises(ValueError, match="app_id_source"):
        Settings.load()


# --------------------------------------------------------------------------- other validators


@pytest.mark.parametrize("value", ["redis", "spool"])
def test_claim_check_accepted(value):
    assert Settings.load(claim_check=value).claim_check == value


@pytest.mark.parametrize("value", ["s3", "", "Redis", "disk"])
def test_claim_check_rejected(value):
    with pytest.raises(ValueError, match="claim_check must be 'redis' or 'spool'"):
        Settings.load(claim_check=value)


OSS_READY = {"oss_endpoint": "https://oss-cn-hangzhou.aliyuncs.com", "oss_access_key_id": "id",
             "oss_access_key_secret": "secret"}


@pytest.mark.parametrize("url", ["file:///abs/dir", "file://rel/dir", "oss://bucket", "oss://bucket/p/q",
                                 "oss://my-logs-2026/app=x/v1.2/"])
def test_store_url_accepted(url):
    assert Settings.load(store_url=url, **OSS_READY).store_url == url


@pytest.mark.parametrize("url, why", [
    ("oss://Bucket/p", "not a bucket name"), ("oss://ab/p", "not a bucket name"),
    ("oss://-bucket/p", "not a bucket name"), ("oss://bu--cket/p", "not a bucket name"),
    ("oss://bucket_1/p", "not a bucket name"), ("oss:///p", "not a bucket name"),
    ("oss://bucket/../up", "plain path segments"), ("oss://bucket/a//b", "plain path segments"),
    ("oss://bucket/a/./b", "plain path segments"), ("oss://bucket/a b", "plain path segments"),
])
def test_an_oss_url_oss_would_refuse_fails_at_start(url, why):
    with pytest.raises(ValueError, match=why):
        Settings.load(store_url=url, **OSS_READY)


@pytest.mark.parametrize("endpoint", ["oss-cn-hangzhou.aliyuncs.com", "ftp://x", "https://", "https://h/path", "h:80"])
def test_an_endpoint_that_is_not_a_url_fails_at_start(endpoint):
    with pytest.raises(ValueError, match="oss_endpoint must be a URL"):
        Settings.load(store_url="oss://bucket/p", **{**OSS_READY, "oss_endpoint": endpoint})


def test_oss_needs_what_its_credential_mode_needs():
    with pytest.raises(ValueError, match="needs SLUICE_OSS_ENDPOINT"):
        Settings.load(store_url="oss://bucket/p")
    with pytest.raises(ValueError, match="needs SLUICE_OSS_ACCESS_KEY_SECRET"):
        Settings.load(store_url="oss://bucket/p", **{**OSS_READY, "oss_access_key_secret": ""})
    with pytest.raises(ValueError, match="needs SLUICE_OSS_SECURITY_TOKEN"):
        Settings.load(store_url="oss://bucket/p", oss_credentials="sts", **OSS_READY)
    with pytest.raises(ValueError, match="needs SLUICE_OSS_ECS_RAM_ROLE"):
        Settings.load(store_url="oss://bucket/p", oss_credentials="ecs_ram_role",
                      oss_endpoint=OSS_READY["oss_endpoint"])
    role = Settings.load(store_url="oss://bucket/p", oss_credentials="ecs_ram_role", oss_ecs_ram_role="sluice-writer",
                         oss_endpoint=OSS_READY["oss_endpoint"])
    assert role.oss_ecs_ram_role == "sluice-writer"


@pytest.mark.parametrize("url", ["s3://bucket", "/abs/dir", "data/archive", "http://x", "", "file:/x"])
def test_store_url_rejected(url):
    with pytest.raises(ValueError, match="store_url must start with file:// or oss://"):
        Settings.load(store_url=url)


@pytest.mark.parametrize("lease, limit", [(120, 120), (100, 120), (1, 300)])
def test_lease_must_exceed_compress_time_limit(lease, limit):
    with pytest.raises(ValueError, match="lock_lease_seconds must exceed compress_time_limit"):
        Settings.load(lock_lease_seconds=lease, compress_time_limit=limit)


def test_lease_just_above_limit_accepted():
    s = Settings.load(lock_lease_seconds=120.5, compress_time_limit=120)
    assert s.lock_lease_seconds == 120.5


def test_lease_check_from_env(monkeypatch):
    monkeypatch.setenv("SLUICE_COMPRESS_TIME_LIMIT", "600")
    with pytest.raises(ValueError, match="lock_lease_seconds must exceed"):
        Settings.load()
    monkeypatch.setenv("SLUICE_LOCK_LEASE_SECONDS", "601")
    assert Settings.load().lock_lease_seconds == 601


# --------------------------------------------------------------------------- secrets


def _secret_settings(**kw) -> Settings:
    return Settings.load(redis_url=REDIS_URL, oss_access_key_id=OSS_ID, oss_access_key_secret=OSS_SECRET, **kw)


def test_repr_and_str_hide_secrets():
    s = _secret_settings()
    assert s.redis_url.get_secret_value() == REDIS_URL  # the secret is really there
    for text in (repr(s), str(s), repr(s.redis_url), str(s.redis_url), str(msgspec.structs.asdict(s))):
        assert "s3cret-pw" not in text
        assert OSS_ID not in text
        assert OSS_SECRET not in text


def test_repr_hides_secrets_from_env(monkeypatch):
    monkeypatch.setenv("SLUICE_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("SLUICE_OSS_ACCESS_KEY_SECRET", OSS_SECRET)
    monkeypatch.setenv("SLUICE_OSS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("SLUICE_OSS_ENDPOINT", "https://oss-cn-hangzhou.aliyuncs.com")
    s = Settings.load()
    assert s.oss_access_key_secret.get_secret_value() == OSS_SECRET
    assert "s3cret-pw" not in repr(s) and OSS_SECRET not in repr(s)
    assert "s3cret-pw" not in str(s) and OSS_SECRET not in str(s)


def test_field_validation_error_does_not_reveal_secrets():
    with pytest.raises(ValueError) as info:
        _secret_settings(claim_check="bogus")
    text = str(info.value)
    assert "claim_check" in text
    assert "s3cret-pw" not in text and OSS_SECRET not in text


def test_model_validation_error_does_not_reveal_secrets(monkeypatch):
    monkeypatch.setenv("SLUICE_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("SLUICE_OSS_ACCESS_KEY_SECRET", OSS_SECRET)
    monkeypatch.setenv("SLUICE_LOCK_LEASE_SECONDS", "1")
    with pytest.raises(ValueError, match="lock_lease_seconds must exceed") as info:
        Settings.load()
    for text in (str(info.value), repr(info.value)):
        assert "s3cret-pw" not in text
        assert OSS_SECRET not in text
