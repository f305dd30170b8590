"""What SLUICE_REDIS_URL may name: a Redis as redis-py reads its URL (redis://, rediss://, unix://),
or a Sentinel-managed one (self-hosted high availability), and how Celery's broker names the same.
Pure parsing, so the settings check it at start-up and the clients are built from it
(sluice.core.redis_client)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

SCHEMES = ("redis", "rediss", "unix")
# A Sentinel-managed Redis (self-hosted high availability): the Sentinels to ask, the name of the
# master they watch, and its database: sentinel://[[user]:password@]host:port[,host:port...]/master[/db].
# The password (and ACL user) are the master's; the Sentinels are asked without one.
SENTINEL_SCHEME = "sentinel"


@dataclass(frozen=True)
class SentinelUrl:
    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str | None
    password: str | None


def parse_sentinel_url(url: str) -> SentinelUrl | None:
    """The parts of a sentinel:// URL; None for any other URL. ValueError, naming what is wrong
    (never the password), for a sentinel:// URL that is not one."""
    parts = urlsplit(url)
    if parts.scheme != SENTINEL_SCHEME:
        return None
    where = parts.netloc.rsplit("@", 1)[-1]
    sentinels = []
    for hostport in where.split(","):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"sentinel URL: {hostport!r} is not host:port")
        sentinels.append((host.strip("[]"), int(port)))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("sentinel URL needs the master's name and may end with a database number: "
                         "sentinel://host:26379[,host:26379]/mymaster[/0]")
    username, password = None, None
    if "@" in parts.netloc:
        auth = parts.netloc.rsplit("@", 1)[0]
        user, _, secret = auth.partition(":")
        username, password = unquote(user) or None, unquote(secret) or None
    return SentinelUrl(tuple(sentinels), path[0], int(path[1]) if len(path) == 2 else 0, username, password)


def celery_broker(url: str) -> tuple[str, dict[str, Any]]:
    """Celery's broker URL for sluice's Redis URL, and the transport options it needs besides
    connection_options(): kombu's sentinel transport takes one sentinel:// URL per Sentinel,
    joined by ';', and the master's name as an option."""
    found = parse_sentinel_url(url)
    if found is None:
        return url, {}
    auth = urlsplit(url).netloc.rsplit("@", 1)[0] + "@" if "@" in urlsplit(url).netloc else ""
    broker = ";".join(f"sentinel://{auth}{host}:{port}/{found.db}" for host, port in found.sentinels)
    return broker, {"master_name": found.master}
