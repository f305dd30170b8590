"""Bad input of every kind lands in the _quarantine app with its reason and every byte kept.

Records are produced with kcat, an independent Kafka client, so this also shows that sluice
reads what other producers write.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from devstack.local import start_pipeline
from tests.integration.conftest import read_archive, wait_archived
from tests.integration.kcat import kcat

# One pipeline for the whole module, so its tests run in one test process.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("test_quarantine")]

MAX_BYTES = 2048

# (name, value bytes, expected reason or None for a good record, expected app)
CASES = [
    ("missing", b'{"msg": "no app field"}', "missing_app_id"),
    ("traversal", b'{"app": "../../etc/passwd", "msg": "x"}', "bad_app_id"),
    ("slash", b'{"app": "a/b", "msg": "x"}', "bad_app_id"),
    ("empty-id", b'{"app": "", "msg": "x"}', "bad_app_id"),
    ("number-id", b'{"app": 42, "msg": "x"}', "bad_app_id"),
    ("too-long-id", b'{"app": "' + b"a" * 65 + b'"}', "bad_app_id"),
    ("underscore-id", b'{"app": "_quarantine", "msg": "spoof"}', "bad_app_id"),
    ("not-json", b"plain text, not json", "undecodable"),
    ("not-utf8", b'{"app": "billing", "msg": "\xff\xfe"}', "undecodable"),
    ("oversized", b'{"app": "billing", "msg": "' + b"x" * MAX_BYTES + b'"}', "oversized"),
    ("multiline", b'{"app": "billing",\n "msg": "two lines"}', "multiline"),
    ("good", b'{"app": "billing", "msg": "fine"}', None),
    ("good-trailing-newline", b'{"app": "billing.api", "msg": "fine"}\n', None),
]


def kcat_produce(workdir: Path, bootstrap: str, files: list[Path], key: str) -> None:
    """kcat sends each file given on its command line as one message, bytes untouched."""
    kcat(workdir, "-P", "-b", bootstrap, "-t", "logs", "-k", key, "-H", "source=kcat", *map(str, files))


@pytest.fixture(scope="module")
def archived(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("quarantine")
    stack = start_pipeline(workdir, partitions=2, SLUICE_RECORD_MAX_BYTES=str(MAX_BYTES))
    try:
        inputs = workdir / "inputs"
        inputs.mkdir()
        files = []
        for name, value, _ in CASES:
            (inputs / name).write_bytes(value)
            files.append(inputs / name)
        kcat_produce(workdir, stack.bootstrap, files, key="k1")
        wait_archived(stack, len(CASES), timeout=120)
        yield stack
    finally:
        stack.close()


def test_each_bad_record_is_quarantined_with_its_reason_and_bytes(archived):
    lines = read_archive(archived.workdir / "archive")
    envelopes = [json.loads(line) for obj, line in lines if "app=_quarantine" in obj.parts]
    by_value = {base64.b64decode(e["value_b64"]): e for e in envelopes}
    for name, value, reason in CASES:
        if reason is None:
            continue
        assert value in by_value, f"{name} was not quarantined"
        envelope = by_value[value]
        assert envelope["reason"] == reason, name
        assert envelope["topic"] == "logs"
        assert base64.b64decode(envelope["key_b64"]) == b"k1"
        assert envelope["headers"] == [["source", base64.b64encode(b"kcat").decode()]]
    assert len(envelopes) == sum(1 for c in CASES if c[2] is not None)


def test_good_records_from_kcat_are_archived_under_their_app(archived):
    lines = read_archive(archived.workdir / "archive")
    good = sorted((obj.parts[-4], line) for obj, line in lines if "app=_quarantine" not in obj.parts)
    assert good == [("app=billing", b'{"app": "billing", "msg": "fine"}'),
                    ("app=billing.api", b'{"app": "billing.api", "msg": "fine"}')]


def test_nothing_escapes_the_archive_or_spool(archived):
    for root in (archived.workdir / "archive", archived.workdir / "spool"):
        for path in root.rglob("*"):
            assert path.resolve().is_relative_to(root.resolve())
    apps = {p.name for p in (archived.workdir / "archive").iterdir()}
    assert apps == {"app=_quarantine", "app=billing", "app=billing.api"}
    assert not list(archived.workdir.rglob("passwd*"))
