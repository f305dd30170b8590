"""The one typed settings object; every component reads configuration through `get_settings()`.

Values come from environment variables prefixed ``SLUICE_`` (e.g. ``SLUICE_REDIS_URL``), so
the bridge, every Celery worker, Beat and the CLI see exactly the same configuration.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sluice.errors import SluiceError

_OSS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_OSS_PREFIX_PART = re.compile(r"[A-Za-z0-9_.=-]+")

APP_ID_KINDS = ("json", "key", "header", "regex")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SLUICE_", extra="ignore", hide_input_in_errors=True)

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Topics to read: a comma-separated list, or "re:<pattern>" for every topic whose whole name
    # matches. Topics created later that match are picked up within topic_refresh_seconds.
    topic: str = "logs"
    topic_refresh_seconds: float = Field(30.0, gt=0)
    group: str = "sluice"
    kafka_session_timeout_ms: int = Field(10_000, gt=0)
    kafka_heartbeat_interval_ms: int = Field(3_000, gt=0)

    # Redis: Celery broker, locks, ledger and (by default) the claim-check store.
    redis_url: SecretStr = SecretStr("redis://127.0.0.1:6379/0")

    # Where finished archives go: file:///abs/dir, file://relative/dir or oss://bucket/prefix.
    store_url: str = "file://data/archive"
    # Local (or NAS) directory for slot files and spooled batches; shared by all workers.
    spool_dir: Path = Path("data/spool")

    # Where a record's app id comes from: "json:<field>", "key", "header:<name>" or
    # "regex:<pattern with one group or a group named app>".
    app_id_source: str = "json:app"
    # JSON field holding the event time (epoch s/ms or ISO 8601); "" means always ingest time.
    timestamp_field: str = "ts"
    record_max_bytes: int = Field(1024 * 1024, gt=0)

    # Bridge batching and claim-check. Every batch makes one frame per app-hour it touches, and
    # each frame costs an append, an fsync and a commit: large batches keep those few per MB.
    batch_max_bytes: int = Field(16 * 1024 * 1024, gt=0)
    batch_max_records: int = Field(100_000, gt=0)
    batch_max_seconds: float = Field(1.0, gt=0)
    claim_check: str = "spool"  # "spool" or "redis"
    # Backpressure: while the batches handed over and not yet compressed hold this many bytes,
    # the bridge pauses its partitions; data waits in Kafka instead of filling Redis or the spool.
    max_inflight_bytes: int = Field(256 * 1024 * 1024, gt=0)
    # A partition that delivered nothing for this long has its high-water mark checked against
    # the broker (a recreated topic), and so have its next records before they are handed over.
    incarnation_check_seconds: float = Field(30.0, gt=0)

    # Compression and slot files.
    zstd_level: int = Field(3, ge=1, le=22)
    slots_per_app: int = Field(10, ge=1, le=1000)
    # Pieces of a batch are compressed in tasks of about this many bytes (see bundle_pieces): two
    # tasks per full batch keep two cpu processes busy; smaller ones cost more in task overhead.
    compress_bundle_bytes: int = Field(8 * 1024 * 1024, gt=0)
    # A piece (one app-hour of a batch) smaller than this is packed with the other small pieces of
    # its batch and hour into one tail piece, appended to a tail file instead of a file of its app
    # (sluice.tail): the long tail of quiet apps then costs a piece, a frame and a file write per
    # batch and hour, not per app. 0: never.
    tail_piece_bytes: int = Field(64 * 1024, ge=0)
    compress_time_limit: float = Field(120.0, gt=0)
    # A slot lock outlives the hard time limit of the task holding it, so a stalled writer is
    # killed by Celery before anyone else can take its slot.
    lock_lease_seconds: float = Field(300.0, gt=0)
    lock_wait_seconds: float = Field(30.0, gt=0)

    # Sealing and upload.
    upload_interval_seconds: float = Field(30.0, gt=0)
    # A slot file is sealed once no record has been appended to it for this long and its hour
    # is over (the wait catches late records), ...
    seal_age_seconds: float = Field(300.0, gt=0)
    # ... or, while its hour is still running, once idle this long: a quiet app's current hour
    # becomes fetchable without cutting a busy app's hour into many files.
    seal_open_hour_age_seconds: float = Field(1800.0, gt=0)
    seal_size_bytes: int = Field(256 * 1024 * 1024, gt=0)
    # In-flight batches older than this get their remaining work enqueued again.
    redrive_after_seconds: float = Field(600.0, gt=0)

    # Monitoring: the bridge serves Prometheus metrics on this port (0: not at all); per-app
    # figures are kept for the top apps by archived volume, the rest summed as app="other".
    metrics_port: int = Field(9464, ge=0, le=65535)
    metrics_top_apps: int = Field(20, ge=0, le=1000)
    # Liveness and readiness files for probes (sluice.health); none if unset.
    health_dir: Path | None = None

    # Aliyun OSS (only for oss:// stores).
    oss_endpoint: str = ""
    oss_access_key_id: SecretStr = SecretStr("")
    oss_access_key_secret: SecretStr = SecretStr("")
    oss_multipart_threshold: int = 64 * 1024 * 1024
    # How sluice signs OSS requests: "static" (the access key pair), "sts" (a temporary key pair
    # and security token from STS AssumeRole) or "ecs_ram_role" (the ECS instance's RAM role,
    # read and renewed from the instance metadata service: no key on the machine at all).
    oss_credentials: Literal["static", "sts", "ecs_ram_role"] = "static"
    oss_security_token: SecretStr = SecretStr("")
    oss_ecs_ram_role: str = ""
    oss_ecs_metadata_url: str = "http://100.100.100.200/latest/meta-data/ram/security-credentials/"

    @field_validator("app_id_source")
    @classmethod
    def _known_app_id_kind(cls, value: str) -> str:
        kind, _, arg = value.partition(":")
        if kind not in APP_ID_KINDS:
            raise ValueError(f"app_id_source must start with one of {APP_ID_KINDS}, got {value!r}")
        if kind in ("json", "header", "regex") and not arg:
            raise ValueError(f"app_id_source {value!r} needs an argument after ':'")
        return value

    @field_validator("topic")
    @classmethod
    def _topics_are_named(cls, value: str) -> str:
        if value.startswith("re:"):
            try:
                re.compile(value[3:])
            except re.error as exc:
                raise ValueError(f"topic pattern {value[3:]!r} does not compile: {exc}") from None
            if not value[3:]:
                raise ValueError("topic pattern after 're:' is empty")
        elif any(not name.strip() for name in value.split(",")):
            raise ValueError(f"topic list {value!r} has an empty name")
        return value

    @property
    def topic_pattern(self) -> str | None:
        """The regular expression of a "re:" topic setting, None for a list."""
        return self.topic[3:] if self.topic.startswith("re:") else None

    @property
    def topics(self) -> list[str]:
        """The topics of a list setting (empty for a pattern)."""
        return [] if self.topic_pattern is not None else [name.strip() for name in self.topic.split(",")]

    @field_validator("claim_check")
    @classmethod
    def _known_claim_check(cls, value: str) -> str:
        if value not in ("redis", "spool"):
            raise ValueError(f"claim_check must be 'redis' or 'spool', got {value!r}")
        return value

    @field_validator("store_url")
    @classmethod
    def _known_store(cls, value: str) -> str:
        if not value.startswith(("file://", "oss://")):
            raise ValueError(f"store_url must start with file:// or oss://, got {value!r}")
        if value.startswith("oss://"):
            bucket, _, prefix = value[len("oss://"):].partition("/")
            if not _OSS_BUCKET.fullmatch(bucket) or "--" in bucket:
                raise ValueError(f"{bucket!r} is not a bucket name OSS accepts: 3-63 lowercase "
                                 "letters, digits and hyphens, starting and ending with a letter or digit")
            parts = prefix.strip("/").split("/") if prefix.strip("/") else []
            if any(part in ("", ".", "..") or not _OSS_PREFIX_PART.fullmatch(part) for part in parts):
                raise ValueError(f"prefix {prefix!r} of store_url must be plain path segments "
                                 "(letters, digits, '_', '-', '.', '='; no empty, '.' or '..' segment)")
        return value

    @field_validator("oss_endpoint")
    @classmethod
    def _endpoint_is_a_url(cls, value: str) -> str:
        if value:
            parsed = urlsplit(value)
            if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/"):
                raise ValueError(f"oss_endpoint must be a URL such as https://oss-cn-hangzhou.aliyuncs.com, "
                                 f"got {value!r}")
        return value

    @model_validator(mode="after")
    def _oss_is_complete(self) -> "Settings":
        if self.store_url.startswith("oss://"):
            if not self.oss_endpoint:
                raise ValueError("an oss:// store_url needs SLUICE_OSS_ENDPOINT")
            missing = [name for name, field_value in (
                ("SLUICE_OSS_ACCESS_KEY_ID", self.oss_access_key_id),
                ("SLUICE_OSS_ACCESS_KEY_SECRET", self.oss_access_key_secret)) if not field_value.get_secret_value()]
            if self.oss_credentials in ("static", "sts") and missing:
                raise ValueError(f"oss_credentials={self.oss_credentials} needs {' and '.join(missing)}")
            if self.oss_credentials == "sts" and not self.oss_security_token.get_secret_value():
                raise ValueError("oss_credentials=sts needs SLUICE_OSS_SECURITY_TOKEN")
            if self.oss_credentials == "ecs_ram_role" and not self.oss_ecs_ram_role:
                raise ValueError("oss_credentials=ecs_ram_role needs SLUICE_OSS_ECS_RAM_ROLE")
        return self

    @field_validator("lock_lease_seconds")
    @classmethod
    def _lease_outlives_task(cls, value: float, info: ValidationInfo) -> float:
        # A field validator (not a model one), so a failure quotes this number, not the
        # whole input with its secrets.
        limit = info.data.get("compress_time_limit")
        if limit is not None and value <= limit:
            raise ValueError("lock_lease_seconds must exceed compress_time_limit, or a stalled "
                             "writer could still be appending when its slot is handed on")
        return value

class SettingsError(SluiceError):
    """A setting is missing or wrong; the message is one line naming each, never a value."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read once from the environment; SettingsError if one is wrong."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"SLUICE_{'_'.join(str(part) for part in error['loc']).upper() or 'SETTINGS'}: "
                             f"{error['msg'].removeprefix('Value error, ')}" for error in exc.errors())
        raise SettingsError(f"bad settings: {problems}") from None
