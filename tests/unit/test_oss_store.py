"""OssStore: key prefixing, multipart threshold and size verification, without a network.

oss2's upload and HEAD calls are replaced, so this checks sluice's side of the contract only;
oss2 itself checks CRC64 of every upload (enable_crc=True).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import SimpleNamespace

import oss2
import pytest

from sluice.archive.store import OssStore, open_store
from sluice.core.settings import Settings
from tests.oss_server import OssServer


@pytest.fixture
def store(monkeypatch):
    settings = Settings.load(store_url="oss://logs-bucket/archive/v1", oss_endpoint="https://oss-cn-hangzhou.aliyuncs.com",
                        oss_access_key_id="id", oss_access_key_secret="secret")
    s = open_store(settings)
    assert isinstance(s, OssStore)
    return s


def test_put_uploads_under_the_prefix_with_the_multipart_threshold(store, monkeypatch, tmp_path):
    local = tmp_path / "f.jsonl.zst"
    local.write_bytes(b"x" * 1000)
    calls = []
    monkeypatch.setattr(oss2, "resumable_upload",
                        lambda bucket, key, path, **kw: calls.append((key, Path(path), kw)))
    monkeypatch.setattr(store.bucket, "head_object", lambda key: SimpleNamespace(content_length=1000))
    store.put(local, "app=a/dt=2026-11-24/hour=09/a.f.jsonl.zst")
    [(key, path, kw)] = calls
    assert key == "archive/v1/app=a/dt=2026-11-24/hour=09/a.f.jsonl.zst"
    assert path == local
    assert kw["multipart_threshold"] == 64 * 1024 * 1024


def test_put_fails_when_the_stored_size_differs(store, monkeypatch, tmp_path):
    local = tmp_path / "f.jsonl.zst"
    local.write_bytes(b"x" * 1000)
    monkeypatch.setattr(oss2, "resumable_upload", lambda *a, **kw: None)
    monkeypatch.setattr(store.bucket, "head_object", lambda key: SimpleNamespace(content_length=999))
    with pytest.raises(IOError, match="verification"):
        store.put(local, "k.jsonl.zst")


def test_list_strips_the_prefix_and_keeps_only_archives(store, monkeypatch):
    objects = [SimpleNamespace(key=f"archive/v1/app=a/dt=2026-11-24/hour=09/{n}") for n in
               ("b.jsonl.zst", "a.jsonl.zst", "stray.txt")]
    seen = {}

    def iterator(bucket, prefix):
        seen["prefix"] = prefix
        return iter(objects)

    monkeypatch.setattr(oss2, "ObjectIterator", iterator)
    keys = store.list("app=a/dt=2026-11-24/hour=09/")
    assert seen["prefix"] == "archive/v1/app=a/dt=2026-11-24/hour=09/"
    assert keys == ["app=a/dt=2026-11-24/hour=09/a.jsonl.zst", "app=a/dt=2026-11-24/hour=09/b.jsonl.zst"]


def test_size_of_a_missing_object_is_none(store, monkeypatch):
    def missing(key):
        raise oss2.exceptions.NotFound(404, {}, "", {})

    monkeypatch.setattr(store.bucket, "head_object", missing)
    assert store.size("nope.jsonl.zst") is None


# A secret no other text would contain by chance ("secret" is the name of oss2's own fields).
SECRET = "Zq7-not-for-logs-4Kx9"


def test_secrets_do_not_show_in_the_store(store, tmp_path, caplog):
    """The secret is in the store (its bucket's signer holds it), yet no repr of the store or of
    its parts, no exception any of its operations raises and no log line of any level (oss2's
    included) shows it: against the OSS test server, each operation that succeeds, one that
    finds nothing, and each with the server down."""
    assert "secret" not in repr(vars(store))
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="oss2")
    shown: list[str] = []
    with OssServer(access_key_secret=SECRET) as server:
        server.create_bucket("secrets-bucket")
        settings = Settings.load(store_url="oss://secrets-bucket/archive/v1", oss_endpoint=server.endpoint,
                                 oss_access_key_id=server.access_key_id, oss_access_key_secret=SECRET,
                                 oss_multipart_threshold=200 * 1024)
        oss = open_store(settings)
        assert isinstance(oss, OssStore)
        credentials = oss.bucket.auth.credentials_provider.get_credentials()
        assert credentials.access_key_secret == SECRET, "the store holds the secret the test looks for"
        small, large = tmp_path / "small", tmp_path / "large"
        small.write_bytes(b"x" * 1000)
        large.write_bytes(os.urandom(500 * 1024))  # above the threshold: multipart
        key = "app=a/dt=2026-11-24/hour=09/a.f.jsonl.zst"

        def every_operation() -> None:
            for operation in (lambda: oss.put(small, key), lambda: oss.put(large, key + ".l"),
                              lambda: oss.put_objects([(key + ".o", b"y" * 100)]), lambda: oss.size(key),
                              lambda: oss.size(key + ".missing"), lambda: oss.read_range(key, 0, 10),
                              lambda: oss.read_range(key, 990, 1010), lambda: oss.read_range(key + ".missing", 0, 1),
                              lambda: oss.open(key).read(), lambda: oss.open(key + ".missing"), oss.apps,
                              lambda: oss.list("app=a/"), lambda: oss.delete(key + ".o")):
                try:
                    shown.append(repr(operation()))
                except Exception as exc:  # noqa: BLE001 - what it raises is looked at, whatever it is
                    shown.extend([repr(exc), str(exc), repr(exc.args)])

        every_operation()
        server.stop()
        every_operation()  # the store is down: every call fails
    for thing in (oss, oss.bucket, oss.bucket.auth, oss.bucket.auth.credentials_provider, oss.bucket.session):
        shown += [repr(thing), str(thing), repr(vars(thing))]
    records = caplog.records
    assert any(r.name.startswith("oss2") for r in records), "oss2's debug log was captured"
    leaks = [text for text in shown if SECRET in text]
    leaks += [r.getMessage() for r in records if SECRET in r.getMessage()]
    leaks += [caplog.handler.format(r) for r in records if SECRET in caplog.handler.format(r)]
    assert not leaks, f"the secret shows in: {leaks[:3]}"
