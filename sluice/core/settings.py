"""The one typed settings object; every component reads configuration through `get_settings()`.

Values come from environment variables prefixed ``SLUICE_`` (e.g. ``SLUICE_REDIS_URL``), so
the bridge, every Celery worker, Beat and the CLI see exactly the same configuration. They are
converted and checked by msgspec, which loads in milliseconds: every CLI command pays for it.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import msgspec
from msgspec import Meta

from sluice.core import redis_url
from sluice.core.errors import SluiceError

_OSS_BUCKET = re.compile(r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]")
_OSS_PREFIX_PART = re.compile(r"[A-Za-z0-9_.=-]+")

APP_ID_KINDS = ("json", "key", "header", "regex")
ENV_PREFIX = "SLUICE_"


class Secret:
    """A setting never shown: its repr and str are stars; `get_secret_value()` gives it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def get_secret_value(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"Secret('{self}')"

    def __str__(self) -> str:
        return "**********" if self._value else ""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


Positive = Annotated[int, Meta(gt=0)]
PositiveSeconds = Annotated[float, Meta(gt=0)]


class Settings(msgspec.Struct, kw_only=True):
    """Every setting; made by `Settings.load()` (or `get_settings()`), which reads and checks them."""

    # Kafka
    kafka_bootstrap: str = "127.0.0.1:9092"
    # Topics to read: a comma-separated list, or "re:<pattern>" for every topic whose whole name
    # matches. Topics created later that match are picked up within topic_refresh_seconds.
    topic: str = "logs"
    topic_refresh_seconds: PositiveSeconds = 30.0
    group: str = "sluice"
    kafka_session_timeout_ms: Positive = 10_000
    kafka_heartbeat_interval_ms: Positive = 3_000

    # Redis: Celery broker, locks, ledger and (by default) the claim-check store.
    redis_url: Secret = Secret("redis://127.0.0.1:6379/0")

    # Where finished archives go: file:///abs/dir, file://relative/dir or oss://bucket/prefix.
    store_url: str = "file://data/archive"
    # Local (or NAS) directory for slot files and spooled batches; shared by all workers.
    spool_dir: Path = Path("data/spool")

    # Where a record's app id comes from: "json:<field>", "key", "header:<name>" or
    # "regex:<pattern with one group or a group named app>".
    app_id_source: str = "json:app"
    # JSON field holding the event time (epoch s/ms or ISO 8601); "" means always ingest time.
    timestamp_field: str = "ts"
    record_max_bytes: Positive = 1024 * 1024

    # Bridge batching and claim-check. Every batch makes one frame per app-hour it touches, and
    # each frame costs an append, an fsync and a commit: large batches keep those few per MB.
    batch_max_bytes: Positive = 16 * 1024 * 1024
    batch_max_records: Positive = 100_000
    batch_max_seconds: PositiveSeconds = 1.0
    claim_check: str = "spool"  # "spool" or "redis"
    # Backpressure: while the batches handed over and not yet compressed hold this many bytes,
    # the bridge pauses its partitions; data waits in Kafka instead of filling Redis or the spool.
    max_inflight_bytes: Positive = 256 * 1024 * 1024
    # A partition that delivered nothing for this long has its high-water mark checked against
    # the broker (a recreated topic), and so have its next records before they are handed over.
    incarnation_check_seconds: PositiveSeconds = 30.0

    # Compression and slot files.
    zstd_level: Annotated[int, Meta(ge=1, le=22)] = 3
    slots_per_app: Annotated[int, Meta(ge=1, le=1000)] = 10
    # Pieces of a batch are compressed in tasks of about this many bytes (see bundle_pieces): two
    # tasks per full batch keep two cpu processes busy; smaller ones cost more in task overhead.
    compress_bundle_bytes: Positive = 8 * 1024 * 1024
    # A piece (one app-hour of a batch) smaller than this is packed with the other small pieces of
    # its batch and hour into one tail piece, appended to a tail file instead of a file of its app
    # (sluice.archive.tail): the long tail of quiet apps then costs a piece, a frame and a file write per
    # batch and hour, not per app. 0: never.
    tail_piece_bytes: Annotated[int, Meta(ge=0)] = 64 * 1024
    compress_time_limit: PositiveSeconds = 120.0
    # A slot lock outlives the hard time limit of the task holding it, so a stalled writer is
    # killed by Celery before anyone else can take its slot.
    lock_lease_seconds: PositiveSeconds = 300.0
    lock_wait_seconds: PositiveSeconds = 30.0

    # Sealing and upload.
    upload_interval_seconds: PositiveSeconds = 30.0
    # A slot file is sealed once no record has been appended to it for this long and its hour
    # is over (the wait catches late records), ...
    seal_age_seconds: PositiveSeconds = 300.0
    # ... or, while its hour is still running, once idle this long: a quiet app's current hour
    # becomes fetchable without cutting a busy app's hour into many files.
    seal_open_hour_age_seconds: PositiveSeconds = 1800.0
    seal_size_bytes: Positive = 256 * 1024 * 1024
    # In-flight batches older than this get their remaining work enqueued again.
    redrive_after_seconds: PositiveSeconds = 600.0

    # Monitoring: the bridge serves Prometheus metrics on this port (0: not at all); per-app
    # figures are kept for the top apps by archived volume, the rest summed as app="_other".
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] = 9464
    metrics_top_apps: Annotated[int, Meta(ge=0, le=1000)] = 20
    # Liveness and readiness files for probes (sluice.ops.health); none if unset.
    health_dir: Path | None = None

    # Aliyun OSS (only for oss:// stores).
    oss_endpoint: str = ""
    oss_access_key_id: Secret = Secret("")
    oss_access_key_secret: Secret = Secret("")
    oss_multipart_threshold: int = 64 * 1024 * 1024
    # How sluice signs OSS requests: "static" (the access key pair), "sts" (a temporary key pair
    # and security token from STS AssumeRole) or "ecs_ram_role" (the ECS instance's RAM role,
    # read and renewed from the instance metadata service: no key on the machine at all).
    oss_credentials: Literal["static", "sts", "ecs_ram_role"] = "static"
    oss_security_token: Secret = Secret("")
    oss_ecs_ram_role: str = ""
    oss_ecs_metadata_url: str = "http://100.100.100.200/latest/meta-data/ram/security-credentials/"

    def __post_init__(self) -> None:
        # Each check names the setting that is wrong and says why, never a secret's value.
        for name, check in (("app_id_source", self._check_app_id_source), ("topic", self._check_topic),
                            ("claim_check", self._check_claim_check), ("oss_endpoint", self._check_endpoint),
                            ("store_url", self._check_store), ("lock_lease_seconds", self._check_lease),
                            ("redis_url", self._check_redis_url)):
            try:
                check()
            except ValueError as exc:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: {exc}") from None

    def _check_redis_url(self) -> None:
        url = self.redis_url.get_secret_value()
        scheme = urlsplit(url).scheme
        if scheme not in (*redis_url.SCHEMES, redis_url.SENTINEL_SCHEME):
            raise ValueError(f"redis_url must start with redis://, rediss://, unix:// or sentinel://, "
                             f"got {scheme or 'no scheme'}://...")  # the rest may hold a password
        redis_url.parse_sentinel_url(url)

    def _check_claim_check(self) -> None:
        if self.claim_check not in ("redis", "spool"):
            raise ValueError(f"claim_check must be 'redis' or 'spool', got {self.claim_check!r}")

    def _check_lease(self) -> None:
        if self.lock_lease_seconds <= self.compress_time_limit:
            raise ValueError("lock_lease_seconds must exceed compress_time_limit, or a stalled "
                             "writer could still be appending when its slot is handed on")

    def _check_endpoint(self) -> None:
        if self.oss_endpoint:
            parsed = urlsplit(self.oss_endpoint)
            if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.path not in ("", "/"):
                raise ValueError(f"oss_endpoint must be a URL such as https://oss-cn-hangzhou.aliyuncs.com, "
                                 f"got {self.oss_endpoint!r}")

    def _check_app_id_source(self) -> None:
        kind, _, arg = self.app_id_source.partition(":")
        if kind not in APP_ID_KINDS:
            raise ValueError(f"app_id_source must start with one of {APP_ID_KINDS}, got {self.app_id_source!r}")
        if kind in ("json", "header", "regex") and not arg:
            raise ValueError(f"app_id_source {self.app_id_source!r} needs an argument after ':'")

    def _check_topic(self) -> None:
        value = self.topic
        if value.startswith("re:"):
            try:
                re.compile(value[3:])
            except re.error as exc:
                raise ValueError(f"topic pattern {value[3:]!r} does not compile: {exc}") from None
            if not value[3:]:
                raise ValueError("topic pattern after 're:' is empty")
        elif any(not name.strip() for name in value.split(",")):
            raise ValueError(f"topic list {value!r} has an empty name")

    def _check_store(self) -> None:
        value = self.store_url
        if not value.startswith(("file://", "oss://")):
            raise ValueError(f"store_url must start with file:// or oss://, got {value!r}")
        if not value.startswith("oss://"):
            return
        bucket, _, prefix = value[len("oss://"):].partition("/")
        if not _OSS_BUCKET.fullmatch(bucket) or "--" in bucket:
            raise ValueError(f"{bucket!r} is not a bucket name OSS accepts: 3-63 lowercase "
                             "letters, digits and hyphens, starting and ending with a letter or digit")
        parts = prefix.strip("/").split("/") if prefix.strip("/") else []
        if any(part in ("", ".", "..") or not _OSS_PREFIX_PART.fullmatch(part) for part in parts):
            raise ValueError(f"prefix {prefix!r} of store_url must be plain path segments "
                             "(letters, digits, '_', '-', '.', '='; no empty, '.' or '..' segment)")
        if not self.oss_endpoint:
            raise ValueError("an oss:// store_url needs SLUICE_OSS_ENDPOINT")
        missing = [name for name, secret in (("SLUICE_OSS_ACCESS_KEY_ID", self.oss_access_key_id),
                                             ("SLUICE_OSS_ACCESS_KEY_SECRET", self.oss_access_key_secret))
                   if not secret.get_secret_value()]
        if self.oss_credentials in ("static", "sts") and missing:
            raise ValueError(f"oss_credentials={self.oss_credentials} needs {' and '.join(missing)}")
        if self.oss_credentials == "sts" and not self.oss_security_token.get_secret_value():
            raise ValueError("oss_credentials=sts needs SLUICE_OSS_SECURITY_TOKEN")
        if self.oss_credentials == "ecs_ram_role" and not self.oss_ecs_ram_role:
            raise ValueError("oss_credentials=ecs_ram_role needs SLUICE_OSS_ECS_RAM_ROLE")

    @property
    def topic_pattern(self) -> str | None:
        """The regular expression of a "re:" topic setting, None for a list."""
        return self.topic[3:] if self.topic.startswith("re:") else None

    @property
    def topics(self) -> list[str]:
        """The topics of a list setting (empty for a pattern)."""
        return [] if self.topic_pattern is not None else [name.strip() for name in self.topic.split(",")]

    @classmethod
    def load(cls, **overrides: Any) -> Settings:
        """The settings of the ``SLUICE_*`` environment variables (their names in any case),
        keyword arguments overriding them; SettingsError naming each wrong one, never a value."""
        named = {key[len(ENV_PREFIX):].lower(): value for key, value in os.environ.items()
                 if key.upper().startswith(ENV_PREFIX)}
        return _checked({**{name: named[name] for name in cls.__struct_fields__ if name in named}, **overrides})

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`, checked as `load` checks them."""
        return _checked({**msgspec.structs.asdict(self), **changes})


def _checked(values: dict[str, Any]) -> Settings:
    """Settings of these values, converted from text where need be; SettingsError if one is wrong."""
    try:
        return msgspec.convert(values, Settings, strict=False, dec_hook=_from_text)
    except msgspec.ValidationError as exc:
        text, _, where = str(exc).partition(" - at `$.")
        name = f"{ENV_PREFIX}{where.rstrip('`').upper()}: " if where else ""
        raise SettingsError(f"bad settings: {name}{text}") from None


def _from_text(kind: type, value: Any) -> Any:
    """Settings types msgspec does not convert by itself."""
    if kind is Path and isinstance(value, (str, Path)):
        return Path(value)
    if kind is Secret:
        if isinstance(value, Secret):
            return value
        if isinstance(value, str):
            return Secret(value)
    raise NotImplementedError


class SettingsError(SluiceError, ValueError):
    """A setting is missing or wrong; the message is one line naming each, never a value."""


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Settings of this process, read once from the environment; SettingsError if one is wrong."""
    return Settings.load()
