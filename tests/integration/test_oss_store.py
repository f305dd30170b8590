"""OssStore over real HTTP against the OSS test server (tests/oss_server.py): nothing patched."""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Iterator

import oss2
import pytest

from sluice.archive.store import OssStore, object_key, open_store
from sluice.core.settings import Settings
from tests.oss_server import OssServer

pytestmark = pytest.mark.integration

KEY = object_key("billing", "2026010109", "2026010109-abc")


@pytest.fixture(scope="module")
def server() -> Iterator[OssServer]:
    with OssServer() as srv:
        yield srv


@pytest.fixture
def bucket_name(server: OssServer) -> str:
    name = f"t-{uuid.uuid4().hex[:16]}"  # moto's state is process-wide: a bucket per test
    server.create_bucket(name)
    return name


def settings_for(server: OssServer, bucket: str, **kw: object) -> Settings:
    keys = {"oss_access_key_id": server.access_key_id, "oss_access_key_secret": server.access_key_secret}
    return Settings.load(store_url=f"oss://{bucket}/archive/v1", oss_endpoint=server.endpoint, **{**keys, **kw})


def test_put_size_list_open_delete(server, bucket_name, tmp_path):
    store = open_store(settings_for(server, bucket_name))
    local = tmp_path / "f"
    local.write_bytes(os.urandom(50_000))
    store.put(local, KEY)
    assert store.size(KEY) == 50_000 and store.size(KEY + ".x") is None
    assert store.list("app=billing/") == [KEY]
    with store.open(KEY) as stream:
        assert stream.read(1000) + stream.read() == local.read_bytes()
    # What landed is under the prefix, byte for byte, as another client sees it.
    assert server.bucket(bucket_name).get_object(f"archive/v1/{KEY}").read() == local.read_bytes()
    store.delete(KEY)
    assert store.list("app=billing/") == []
    with pytest.raises(FileNotFoundError):
        store.open(KEY)


def test_listing_pages_through_more_than_a_thousand_objects(server, bucket_name):
    store = open_store(settings_for(server, bucket_name))
    raw = server.bucket(bucket_name)
    keys = [object_key("billing", "2026010109", f"f{i:05d}") for i in range(1_050)]
    for key in keys:
        raw.put_object(f"archive/v1/{key}", b"x")
    raw.put_object("archive/v1/app=billing/dt=2026-01-01/hour=09/not-an-archive.txt", b"x")
    assert store.list("app=billing/dt=2026-01-01/hour=09/") == sorted(keys)


def test_multipart_above_the_threshold_round_trips(server, bucket_name, tmp_path):
    store = open_store(settings_for(server, bucket_name, oss_multipart_threshold=300 * 1024))
    local = tmp_path / "big"
    local.write_bytes(os.urandom(1_200_000))
    store.put(local, KEY)
    head = server.bucket(bucket_name).head_object(f"archive/v1/{KEY}")
    assert head.object_type == "Multipart" and head.content_length == 1_200_000
    with store.open(KEY) as stream:
        assert stream.read() == local.read_bytes()


def test_a_read_whose_crc_does_not_match_is_an_error(server, bucket_name, tmp_path, monkeypatch):
    store = open_store(settings_for(server, bucket_name))
    local = tmp_path / "f"
    local.write_bytes(b"payload" * 1000)
    store.put(local, KEY)
    stream = store.open(KEY)
    monkeypatch.setattr(type(stream.result), "server_crc", property(lambda self: 12345))
    with pytest.raises(IOError, match="CRC-64"):
        while stream.read(1000):
            pass


def test_a_key_that_would_leave_the_prefix_is_refused(server, bucket_name):
    store = open_store(settings_for(server, bucket_name))
    for key in ("../../etc/x.jsonl.zst", "/abs.jsonl.zst", "app=a/../../x.jsonl.zst", "a//b.jsonl.zst"):
        with pytest.raises(ValueError, match="would leave the store's prefix"):
            store.size(key)


def test_wrong_credentials_are_a_clear_error_and_the_secret_is_never_logged(server, bucket_name, tmp_path,
                                                                            caplog):
    secret = "wrong-Secret-Value-31337"
    store = OssStore(bucket_name, "archive", settings_for(server, bucket_name, oss_access_key_secret=secret))
    local = tmp_path / "f"
    local.write_bytes(b"x")
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(oss2.exceptions.ServerError) as refused:
            store.put(local, KEY)
        logging.getLogger("sluice.test").error("upload failed: %s", refused.value)
    assert refused.value.status == 403 and refused.value.code == "SignatureDoesNotMatch"
    assert secret not in caplog.text and secret not in str(refused.value)


def test_sts_credentials_sign_with_their_token(server, bucket_name, tmp_path):
    store = open_store(settings_for(server, bucket_name, oss_credentials="sts", oss_security_token="sts-token-1"))
    local = tmp_path / "f"
    local.write_bytes(b"sts")
    store.put(local, KEY)
    assert store.size(KEY) == 3


def test_the_ecs_ram_role_credentials_come_from_the_metadata_service(server, bucket_name, tmp_path):
    asked: list[str] = []

    class Metadata(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's name
            asked.append(self.path)
            body = json.dumps({"Code": "Success", "AccessKeyId": server.access_key_id,
                               "AccessKeySecret": server.access_key_secret, "SecurityToken": "role-token",
                               "Expiration": "2099-01-01T00:00:00Z", "LastUpdated": "2026-01-01T00:00:00Z"})
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body.encode())

        def log_message(self, *args: object) -> None:
            pass

    metadata = HTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=metadata.serve_forever, daemon=True).start()
    try:
        settings = Settings.load(store_url=f"oss://{bucket_name}/archive", oss_endpoint=server.endpoint,
                            oss_credentials="ecs_ram_role", oss_ecs_ram_role="sluice-writer",
                            oss_ecs_metadata_url=f"http://127.0.0.1:{metadata.server_port}/latest/meta-data/"
                                                 "ram/security-credentials/")
        store = open_store(settings)
        local = tmp_path / "f"
        local.write_bytes(b"role")
        store.put(local, KEY)
        assert store.size(KEY) == 4
        assert asked and asked[0].endswith("/security-credentials/sluice-writer")
    finally:
        metadata.shutdown()


def test_ranged_reads_many_small_objects_and_the_apps_present(server, bucket_name):
    store = open_store(settings_for(server, bucket_name))
    data = os.urandom(10_000)
    keys = [f"app={app}/dt=2026-11-24/hour=09/{app}.f.jsonl.zst" for app in ("billing", "auth", "web")]
    store.put_objects([(key, data) for key in keys])
    assert [store.size(key) for key in keys] == [10_000] * 3
    assert store.read_range(keys[0], 100, 356) == data[100:356]
    assert store.read_range(keys[0], 9_000, 10_000) == data[9_000:]
    # Past the end: short, an error, not silent. OssStore.read_range's own length check raises a
    # plain OSError (IOError), not one of its subclasses (FileNotFoundError, a connection error).
    with pytest.raises(OSError, match=r"^app=billing/\S+: 10 bytes at 9990, 20 asked for$") as short:
        store.read_range(keys[0], 9_990, 10_010)
    assert type(short.value) is OSError, repr(short.value)
    with pytest.raises(FileNotFoundError):
        store.read_range(keys[0] + ".x", 0, 10)
    assert store.apps() == ["auth", "billing", "web"]
