"""Pure parts of monitoring: bounded per-app labels, batch timestamps, topic settings and the
one-line settings error."""

from __future__ import annotations

import pytest
from aiokafka.record.default_records import DefaultRecordBatchBuilder
from kafka.record.legacy_records import LegacyRecordBatchBuilder

from sluice.kafka_batches import Chunk
from sluice.monitoring import OTHER_APPS, top_apps
from sluice.settings import Settings, SettingsError, get_settings


def test_top_apps_keeps_k_and_sums_the_rest_as_other():
    per_app = {"a": 5, "b": 50, "c": 7, "d": 1}
    assert top_apps(per_app, 2) == {"b": 50, "c": 7, OTHER_APPS: 6}
    assert top_apps(per_app, 10) == per_app
    assert top_apps({"a": 1, "b": 2}, 1, by={"a": 100, "b": 1}) == {"a": 1, OTHER_APPS: 2}
    assert top_apps({}, 3) == {}


def test_other_is_no_valid_app_id():
    from sluice.records import valid_app_id

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
    assert Settings(topic="logs").topics == ["logs"]
    assert Settings(topic=" a , b").topics == ["a", "b"] and Settings(topic="a,b").topic_pattern is None
    assert Settings(topic="re:app-.*").topic_pattern == "app-.*" and Settings(topic="re:app-.*").topics == []


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
