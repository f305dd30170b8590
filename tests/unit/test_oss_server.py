"""The OSS test server (tests/oss_server.py) as oss2 sees it, over real HTTP.

These pin down what the integration tests rely on: a wrong key is refused, the CRC-64 header
is present and right (so oss2's enable_crc check is live), listing pages through >1,000 keys
without losing or repeating one, multipart uploads round-trip, and stop()/start() keeps data.
"""

from __future__ import annotations

import itertools
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import oss2
import pytest
import requests

from tests import oss_server
from tests.oss_server import OssServer


@pytest.fixture(scope="module")
def server() -> Iterator[OssServer]:
    with OssServer() as srv:
        yield srv


@pytest.fixture
def bucket(server: OssServer) -> oss2.Bucket:
    """A fresh bucket per test: moto's state is process-wide."""
    name = f"t-{uuid.uuid4().hex[:16]}"
    server.create_bucket(name)
    return server.bucket(name)


def keys(bucket: oss2.Bucket, **kwargs: object) -> list[str]:
    """Every key ObjectIterator yields; capped, so a listing that never ends fails, not hangs."""
    listed = list(itertools.islice(oss2.ObjectIterator(bucket, **kwargs), 5000))
    assert len(listed) < 5000, "listing does not terminate (marker not honoured?)"
    return [o.key for o in listed]


def crc_of(data: bytes) -> int:
    crc = oss2.utils.Crc64()
    crc.update(data)
    return crc.crc


def signed_headers(server: OssServer, method: str, bucket: str, key: str,
                   params: dict[str, str]) -> dict[str, str]:
    """Headers oss2 itself would sign for this request (to replay them against another one)."""
    url = f"{server.endpoint}/{bucket}/{key}"
    request = oss2.http.Request(method, url, params=params)
    oss2.Auth(server.access_key_id, server.access_key_secret)._sign_request(request, bucket, key)
    return dict(request.headers)


# -- signature ---------------------------------------------------------------------------------

def test_wrong_secret_is_refused_with_signature_does_not_match(server: OssServer,
                                                               bucket: oss2.Bucket) -> None:
    bucket.put_object("k", b"kept")
    bad = oss2.Bucket(oss2.Auth(server.access_key_id, "not-the-secret"), server.endpoint,
                      bucket.bucket_name)
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch):
        bad.put_object("k", b"overwritten?")
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch):
        bad.get_object("k")
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch):  # HEAD: error in x-oss-err
        bad.head_object("k")
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch):
        list(oss2.ObjectIterator(bad))
    assert bucket.get_object("k").read() == b"kept"


def test_unknown_key_id_and_unsigned_requests_are_refused(server: OssServer,
                                                          bucket: oss2.Bucket) -> None:
    stranger = oss2.Bucket(oss2.Auth("someone-else", server.access_key_secret), server.endpoint,
                           bucket.bucket_name)
    with pytest.raises(oss2.exceptions.ServerError) as refused:
        stranger.put_object("k", b"x")
    assert (refused.value.status, refused.value.code) == (403, "InvalidAccessKeyId")

    anonymous = oss2.Bucket(oss2.AnonymousAuth(), server.endpoint, bucket.bucket_name)
    with pytest.raises(oss2.exceptions.AccessDenied):
        anonymous.put_object("k", b"x")
    assert not bucket.object_exists("k")


def test_signature_covers_the_resource_and_signed_subresources(server: OssServer,
                                                               bucket: oss2.Bucket) -> None:
    bucket.put_object("a", b"A")
    bucket.put_object("b", b"B")
    name = bucket.bucket_name
    headers = signed_headers(server, "GET", name, "a", {})
    assert requests.get(f"{server.endpoint}/{name}/a", headers=headers, timeout=5).content == b"A"
    replayed = requests.get(f"{server.endpoint}/{name}/b", headers=headers, timeout=5)
    assert replayed.status_code == 403 and b"SignatureDoesNotMatch" in replayed.content

    headers = signed_headers(server, "GET", name, "a", {"uploadId": "1"})
    replayed = requests.get(f"{server.endpoint}/{name}/a?uploadId=2", headers=headers, timeout=5)
    assert replayed.status_code == 403 and b"SignatureDoesNotMatch" in replayed.content


# -- CRC-64 ------------------------------------------------------------------------------------

def test_crc_header_on_put_get_and_head_is_the_crc64_of_the_bytes(bucket: oss2.Bucket) -> None:
    data = os.urandom(300_000)
    put = bucket.put_object("dir/blob", data)
    assert put.crc == crc_of(data)

    got = bucket.get_object("dir/blob")
    assert got.read() == data
    assert got.server_crc == crc_of(data) == got.client_crc
    assert bucket.head_object("dir/blob").server_crc == crc_of(data)

    # The standard CRC-64/XZ check value, so the server doesn't just agree with oss2's code.
    assert bucket.put_object("check", b"123456789").crc == 0x995DC9BBDF1939FA


def test_oss2_crc_check_is_live_against_this_server(bucket: oss2.Bucket,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(oss_server, "crc64", lambda data: 12345)
    with pytest.raises(oss2.exceptions.InconsistentError):
        bucket.put_object("k", b"payload")


def test_multipart_complete_returns_the_whole_objects_crc(bucket: oss2.Bucket) -> None:
    parts_data = [os.urandom(200 * 1024), os.urandom(200 * 1024), os.urandom(1234)]
    upload_id = bucket.init_multipart_upload("mp").upload_id
    parts = []
    for number, chunk in enumerate(parts_data, start=1):
        result = bucket.upload_part("mp", upload_id, number, chunk)
        assert result.crc == crc_of(chunk)
        parts.append(oss2.models.PartInfo(number, result.etag, size=len(chunk), part_crc=result.crc))
    complete = bucket.complete_multipart_upload("mp", upload_id, parts)

    whole = b"".join(parts_data)
    assert complete.crc == crc_of(whole)
    assert bucket.get_object("mp").read() == whole


def test_resumable_upload_of_a_few_mb_round_trips_byte_exactly(bucket: oss2.Bucket,
                                                               tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 4321)
    local = tmp_path / "archive.bin"
    local.write_bytes(data)
    oss2.resumable_upload(bucket, "archives/a.bin", str(local),
                          store=oss2.ResumableStore(root=str(tmp_path)),
                          multipart_threshold=1024 * 1024, part_size=1024 * 1024, num_threads=3)

    head = bucket.head_object("archives/a.bin")
    assert head.content_length == len(data)
    assert head.etag.endswith("-4") and head.object_type == "Multipart"  # four parts, not a PUT
    assert head.server_crc == crc_of(data)
    assert bucket.get_object("archives/a.bin").read() == data
    downloaded = tmp_path / "back.bin"
    bucket.get_object_to_file("archives/a.bin", str(downloaded))  # checks the CRC itself
    assert downloaded.read_bytes() == data
    assert [o.type for o in oss2.ObjectIterator(bucket, prefix="archives/")] == ["Multipart"]


def test_the_write_log_has_each_object_write_once_and_nothing_else(server: OssServer, bucket: oss2.Bucket,
                                                                     tmp_path: Path) -> None:
    """A PUT and a multipart upload (not its parts) each count as one write; reads, HEADs,
    listings and deletes as none; a second PUT of the same key as a second write."""
    local = tmp_path / "mp.bin"
    local.write_bytes(os.urandom(300 * 1024))
    before = len(server.writes)
    bucket.put_object("w/one", b"1")
    oss2.resumable_upload(bucket, "w/multi", str(local), store=oss2.ResumableStore(root=str(tmp_path)),
                          multipart_threshold=100 * 1024, part_size=100 * 1024, num_threads=2)
    bucket.get_object("w/one").read()
    bucket.head_object("w/multi")
    keys(bucket, prefix="w/")
    bucket.put_object("w/one", b"2")
    bucket.delete_object("w/multi")
    assert server.writes[before:] == [f"/{bucket.bucket_name}/w/one", f"/{bucket.bucket_name}/w/multi",
                                      f"/{bucket.bucket_name}/w/one"]


# -- listing -----------------------------------------------------------------------------------

def test_listing_pages_beyond_1000_keys_and_honours_prefixes(bucket: oss2.Bucket) -> None:
    many = [f"many/{i:05d}.jsonl.zst" for i in range(1203)]
    others = ["many", "manyx/1", "other/1", "a b/ü+%.txt"]
    for key in many + others:
        bucket.put_object(key, b"x")

    for page in (1000, 100):
        # Every key once and in order; nothing from "manyx/" or the object "many" itself.
        assert keys(bucket, prefix="many/", max_keys=page) == many
    everything = keys(bucket, max_keys=1000)
    assert sorted(everything) == sorted(many + others) and len(set(everything)) == len(everything)
    assert keys(bucket, prefix="a b/") == ["a b/ü+%.txt"]
    assert [o.type for o in oss2.ObjectIterator(bucket, prefix="other/")] == ["Normal"]


def test_listing_with_delimiter_returns_each_common_prefix_once(bucket: oss2.Bucket) -> None:
    for day in range(5):
        for n in range(3):
            bucket.put_object(f"root/day{day}/part{n}", b"x")
    for n in range(4):
        bucket.put_object(f"root/file{n}", b"x")

    entries = list(itertools.islice(
        oss2.ObjectIterator(bucket, prefix="root/", delimiter="/", max_keys=2), 100))
    assert [o.key for o in entries if o.is_prefix()] == [f"root/day{d}/" for d in range(5)]
    assert [o.key for o in entries if not o.is_prefix()] == [f"root/file{n}" for n in range(4)]


# -- objects and restarts ----------------------------------------------------------------------

def test_delete_head_and_exists(bucket: oss2.Bucket) -> None:
    bucket.put_object("gone", b"soon", headers={"x-oss-meta-origin": "unit-test"})
    assert bucket.object_exists("gone")
    head = bucket.head_object("gone")
    assert (head.content_length, head.object_type) == (4, "Normal")
    assert head.headers.get("x-oss-meta-origin") == "unit-test"
    bucket.delete_object("gone")
    assert not bucket.object_exists("gone")
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.get_object("gone")
    with pytest.raises(oss2.exceptions.NotFound):
        bucket.head_object("gone")


def test_stop_start_keeps_objects_and_port(tmp_path: Path) -> None:
    srv = OssServer()
    port = srv.port
    with srv:
        srv.create_bucket("restart-me")
        bucket = srv.bucket("restart-me")
        bucket.put_object("kept", b"across restarts")
        srv.stop()
        assert not srv.running
        with pytest.raises(oss2.exceptions.RequestError):
            bucket.get_object("kept")
        srv.start()
        assert srv.port == port and srv.endpoint == f"http://127.0.0.1:{port}"
        assert bucket.get_object("kept").read() == b"across restarts"
        bucket.put_object("after", b"1")
    assert not srv.running
    with pytest.raises(oss2.exceptions.RequestError):
        bucket.head_object("after")
