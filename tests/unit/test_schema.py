"""The Redis schema is the one home of every key and format: the builders round-trip, the Lua
scripts build names by the same patterns, and no other file spells a key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sluice.core import schema, scripts
from sluice.core.schema import BatchState

ROOT = Path(__file__).resolve().parents[2]


def test_formats_round_trip():
    assert schema.parse_app_hour(schema.app_hour("billing", "2026010109")) == ("billing", "2026010109")
    assert schema.parse_slot_id(schema.slot_id("billing", "2026010109", 7)) == ("billing", "2026010109", 7)
    fid = schema.new_fid("2026010109", "0123456789abcdef")
    assert schema.parse_sealed_entry(schema.sealed_entry("a.b-c", "2026010109", fid)) == ("a.b-c", "2026010109", fid)
    assert schema.parse_plan(schema.NEW_OBJECT) is None
    assert schema.parse_plan(schema.merge_plan("app=a/dt=2026-01-01/hour=09/a.x.jsonl.zst", 123)) == \
        ("app=a/dt=2026-01-01/hour=09/a.x.jsonl.zst", 123)
    assert schema.parse_piece_ref(schema.piece_ref("tok", 10, 20, 3, (5, 9))) == ("tok", 10, 20, 3, (5, 9))
    assert schema.parse_piece_ref(schema.piece_ref("tok", 10, 20, 3)) == ("tok", 10, 20, 3, None)  # before spans
    assert schema.parse_piece_ref(b"tok:10:20") == ("tok", 10, 20, None, None)  # written before counts
    assert schema.parse_batch_id(schema.batch_id("logs.v2", 3, 10, 99, incarnation=2)) == ("logs.v2", 3, 10, 99)


def test_the_scripts_build_names_by_the_schemas_patterns():
    """ACQUIRE, VERIFY and COMMIT build slot ids, lock and state keys, piece names and sealed
    entries themselves; these are the patterns they use, checked against the builders."""
    app, hour, fid = "web", "2026010109", schema.new_fid("2026010109", "f" * 16)
    sid = schema.slot_id(app, hour, 4)
    assert "local sid = stem .. '|' .. (k - 1)" in scripts.ACQUIRE
    assert sid == schema.app_hour(app, hour) + "|" + str(4)
    assert "lockp .. sid" in scripts.ACQUIRE and "slotp .. sid" in scripts.ACQUIRE
    assert schema.slot_lock(sid) == schema.SLOT_LOCK_PREFIX + sid
    assert schema.slot_state(sid) == schema.SLOT_STATE_PREFIX + sid
    assert "string.match(sid, '^([^|]*)|([^|]*)|')" in scripts.COMMIT
    assert re.match(r"^([^|]*)\|([^|]*)\|", sid).groups() == (app, hour)
    tail_sid = schema.slot_id(schema.TAIL_APP, hour, 0)
    assert re.match(r"^([^|]*)\|([^|]*)\|", tail_sid).groups() == (schema.TAIL_APP, hour)
    assert "local piece = app .. '|' .. hour" in scripts.COMMIT
    assert "piece .. '|' .. fid" in scripts.COMMIT
    assert schema.sealed_entry(app, hour, fid) == schema.app_hour(app, hour) + "|" + fid


def test_the_scripts_use_the_batch_states_of_the_schema():
    assert f"redis.call('SET', KEYS[3], '{BatchState.HANDED.value}')" in scripts.HAND_OVER
    assert f"~= '{BatchState.HANDED.value}' then return 0" in scripts.SPLIT_COMMIT
    assert f"redis.call('SET', KEYS[1], '{BatchState.SPLIT.value}')" in scripts.SPLIT_COMMIT
    assert "$" not in scripts.HAND_OVER + scripts.SPLIT_COMMIT, "every placeholder was filled"


@pytest.mark.parametrize("key", [
    schema.HWM, schema.INFLIGHT, schema.SEALED, schema.UPLOAD_PLAN, schema.SWEEP_LOCK,
    schema.batch_state("logs:0:0-99"), schema.batch_queued("logs.v2:11:5-9@3"),
    schema.slot_lock(schema.slot_id("a", "2026010109", 0)), schema.slot_state(schema.slot_id("a", "2026010109", 9)),
    schema.upload_lock("a", "2026010109"), schema.upload_queued("_quarantine", "2026010109"),
    schema.TAIL_PLAN, schema.slot_state(schema.slot_id(schema.TAIL_APP, "2026010109", 1)),
    schema.upload_queued(schema.TAIL_APP, "2026010109"),
])
def test_every_builder_makes_a_schema_key(key):
    assert key.startswith(schema.PREFIX) and schema.is_schema_key(key)


@pytest.mark.parametrize("rest", ["hwm2", "b:nonsense", "slot:a|2026010109", "lock:a", "upload-queued:a"])
def test_a_key_the_schema_does_not_define_is_told(rest):
    assert not schema.is_schema_key(schema.PREFIX + rest)


def test_no_file_but_the_schema_spells_a_key():
    # A string starting so (not a docstring, not the image sluice:latest).
    literal = re.compile(r"""(?<!["'])[bfr]*["']sluice:(?!latest\b)\S""")
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        parts = path.relative_to(ROOT).parts
        if parts[0] in (".venv", "data", "build") or path == ROOT / "sluice" / "core" / "schema.py":
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if literal.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not offenders, "Redis keys are built by sluice.core.schema:\n" + "\n".join(offenders)


def test_the_tail_pseudo_app_can_never_be_a_real_app():
    from sluice.formats.records import valid_app_id

    assert not valid_app_id(schema.TAIL_APP)
