"""SLUICE_REDIS_URL's forms (sluice.core.redis_url): a Sentinel-managed Redis for redis-py and for
Celery's broker alike, and clear errors that never show the password."""

from __future__ import annotations

import pytest

from sluice.core.redis_url import SentinelUrl, celery_broker, parse_sentinel_url
from sluice.core.settings import Settings, SettingsError


def test_a_sentinel_url_names_its_sentinels_master_database_and_credentials():
    assert parse_sentinel_url("sentinel://app:s3cret@10.0.0.1:26379,[::1]:26380/mymaster/2") == SentinelUrl(
        (("10.0.0.1", 26379), ("::1", 26380)), "mymaster", 2, "app", "s3cret")
    assert parse_sentinel_url("sentinel://h:26379/m") == SentinelUrl((("h", 26379),), "m", 0, None, None)
    assert parse_sentinel_url("redis://h:6379/0") is None


def test_celery_gets_one_url_per_sentinel_and_the_master_as_an_option():
    broker, options = celery_broker("sentinel://:pw@a:1,b:2/m/3")
    assert broker == "sentinel://:pw@a:1/3;sentinel://:pw@b:2/3" and options == {"master_name": "m"}
    assert celery_broker("redis://h:6379/0") == ("redis://h:6379/0", {})


@pytest.mark.parametrize("url, says", [
    ("sentinel://:topsecret@h/m", "is not host:port"),
    ("sentinel://:topsecret@h:1", "needs the master's name"),
    ("sentinel://:topsecret@h:1/m/x", "needs the master's name"),
    ("http://:topsecret@h:1/0", "must start with redis://"),
])
def test_a_bad_redis_url_stops_with_a_line_that_names_it_not_its_password(url, says):
    with pytest.raises(SettingsError) as caught:
        Settings.load(redis_url=url)
    assert "SLUICE_REDIS_URL" in str(caught.value) and says in str(caught.value)
    assert "topsecret" not in str(caught.value)
