"""Pure parts of monitoring: bounded per-app labels, the warning of an unreadable spool, batch
timestamps, topic settings and the one-line settings error."""

from __future__ import annotations

import logging

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.legacy_records import LegacyRecordBatchBuilder

from sluice.core.settings import Settings, SettingsError, get_settings
from sluice.handover.kafka_batches import Chunk
from sluice.ops import monitoring
from sluice.ops.monitoring import OTHER_APPS, spool_space, top_apps


def test_top_apps_keeps_k_and_sums_the_rest_as_other():
    per_app = {"a": 5, "b": 50, "c": 7, "d": 1}
    assert top_apps(per_app, 2) == {"b": 50, "c": 7, OTHER_APPS: 6}
    assert top_apps(per_app, 10) == per_app
    assert top_apps({"a": 1, "b": 2}, 1, by={"a": 100, "b": 1}) == {"a": 1, OTHER_APPS: 2}
    assert top_apps({}, 3) == {}


def test_an_unreadable_spool_is_logged_once_per_error(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(monitoring, "_spool_space_error", None)
    missing = tmp_path / "no-such-spool"
    with caplog.at_level(logging.WARNING, logger="sluice.ops.monitoring"):
        assert spool_space(missing) is None
        assert spool_space(missing) is None  # the next scrape: the same error, not logged again
    (warning,) = [r for r in caplog.records if r.name == "sluice.ops.monitoring"]
    assert warning.levelno == logging.WARNING
    assert str(missing) in warning.getMessage() and "No such file or directory" in warning.getMessage()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="sluice.ops.monitoring"):
        assert spool_space(tmp_path) is not None  # readable again: nothing logged
        assert spool_space(missing) is None  # ... and the same failure again is logged again
    assert len([r for r in caplog.records if r.name == "sluice.ops.monitoring"]) == 1


def test_other_is_no_valid_app_id():
    from sluice.formats.records import valid_app_id

    assert not valid_app_id(OTHER_APPS)


def test_a_batch_header_gives_its_first_timestamp():
    builder = DefaultRecordBatchBuilder(2, 0, False, -1, -1, -1, 1 << 20)
    builder.append(0, 1_795_000_000_123, None, b"x", [])
    builder.append(1, 1_795_000_000_456, None, b"y", [])
    assert Chunk(0, 1, bytes(builder.build())).first_timestamp_ms == 1_795_000_000_123
    legacy = LegacyRecordBatchBuilder(1, 0, 1 << 20)
    legacy.append(0, 1_795_000_000_789, None, b"z")
    assert Chunk(0, 0, bytes(legacy.build())).first_timestamp_ms == 1_795_000_000_789
    assert Chunk(0, 0, b"\0" * 10).first_timestamp_ms is None


def test_topics_are_a_list_or_a_pattern():
    assert Settings.load(topic="logs").topics == ["logs"]
    assert Settings.load(topic=" a , b").topics == ["a", "b"] and Settings.load(topic="a,b").topic_pattern is None
    assert Settings.load(topic="re:app-.*").topic_pattern == "app-.*" and Settings.load(topic="re:app-.*").topics == []


@pytest.mark.parametrize("topic, why", [("a,,b", "empty name"), ("logs,", "empty name"),
                                        ("re:(", "does not compile"), ("re:", "empty")])
def test_a_bad_topic_setting_is_one_line_naming_it(monkeypatch, topic, why):
    monkeypatch.setenv("SLUICE_TOPIC", topic)
    monkeypatch.setenv("SLUICE_OSS_ACCESS_KEY_SECRET", "s3cr3t-value")
    get_settings.cache_clear()
    try:
        with pytest.raises(SettingsError) as caught:
            get_settings()
    finally:
        get_settings.cache_clear()
    message = str(caught.value)
    assert "\n" not in message and "SLUICE_TOPIC" in message and why in message
    assert "s3cr3t" not in message
