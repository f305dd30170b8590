"""OssStore: key prefixing, multipart threshold and size verification, without a network.

oss2's upload and HEAD calls are replaced, so this checks sluice's side of the contract only;
oss2 itself checks CRC64 of every upload (enable_crc=True).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import oss2
import pytest

from sluice.archive.store import OssStore, open_store
from sluice.core.settings import Settings


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


def test_secrets_do_not_show_in_the_store(store):
    assert "secret" not in repr(vars(store))
