"""The whole pipeline archiving to oss://bucket/prefix on the OSS test server over HTTP, through
a 15-second outage of the store: every record exactly once, and `sluice fetch` reads it back."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import oss2
import pytest
import redis

from devstack.local import wait_until
from sluice.core import schema
from tests.integration.conftest import Traffic, assert_exactly_once, wait_archived
from tests.oss_server import OssServer

pytestmark = pytest.mark.integration

PREFIX = "logs/v1"


def download(server: OssServer, bucket: str, into: Path) -> int:
    """Every object under PREFIX, into the same layout below `into`, as another client reads it."""
    count = 0
    raw = server.bucket(bucket)
    for obj in oss2.ObjectIterator(raw, prefix=PREFIX + "/"):
        path = into / obj.key[len(PREFIX) + 1:]
        path.parent.mkdir(parents=True, exist_ok=True)
        raw.get_object_to_file(obj.key, str(path))  # oss2 compares the CRC-64 here
        count += 1
    return count


# Fifteen upload sweeps (SLUICE_UPLOAD_INTERVAL_SECONDS is 1 s in the tests).
OUTAGE_SECONDS = 15
MANY_SWEEPS = 5  # at least this many of them fail to upload the same sealed file
# The io worker's line for a sealed file (app|hour|fid) or an hour's tail files (the hour) it could
# not archive (sluice.archive.uploader, the tail task), and the reason: when the store does not
# answer, oss2's RequestError naming the store's port.
FAILED_UPLOAD = re.compile(r"ERROR/[^\]]*\] (?:[\w.]+\[[\w-]+\]: )?archiving (?:the tail files of )?(\S+) failed, "
                           r"will retry: (.*)")


def test_the_pipeline_archives_to_oss_exactly_once_through_a_store_outage(stack_factory, tmp_path):
    with OssServer() as server:
        bucket = f"sluice-{uuid.uuid4().hex[:12]}"
        server.create_bucket(bucket)
        stack = stack_factory(SLUICE_STORE_URL=f"oss://{bucket}/{PREFIX}", SLUICE_OSS_ENDPOINT=server.endpoint,
                              SLUICE_OSS_ACCESS_KEY_ID=server.access_key_id,
                              SLUICE_OSS_ACCESS_KEY_SECRET=server.access_key_secret,
                              SLUICE_OSS_MULTIPART_THRESHOLD=str(256 * 1024))
        r = redis.Redis.from_url(stack.redis_url)
        traffic = Traffic(stack, records=30_000)
        uploaded = lambda: next(oss2.ObjectIterator(server.bucket(bucket), prefix=PREFIX + "/"), None)  # noqa: E731
        wait_until(lambda: r.hlen(schema.SEALED) > 0 or uploaded() is not None, 120, "the first sealed files")
        server.stop()  # the store is gone for many upload sweeps while records keep coming
        traffic.finish()
        time.sleep(OUTAGE_SECONDS)  # the outage's length is what is tested; there is nothing to poll for
        io = stack.service("io").log
        during = io.read_text()  # what the io worker logged up to the end of the outage
        server.start()
        wait_archived(stack, 30_000, timeout=300)
        archive = tmp_path / "archive"
        assert download(server, bucket, archive) > 0
        assert_exactly_once(archive, traffic.seqs)
        io_log = io.read_text()
        failed = FAILED_UPLOAD.findall(during)
        assert failed, "uploads failed during the outage"
        # oss2's RequestError: refused at the server's port, or cut off as the server stopped mid-request.
        unanswered = [(entry, why) for entry, why in failed if "RequestError" in why and (
            f"port={server.port}" in why or "Connection aborted" in why or "Connection reset" in why)]
        assert unanswered == failed, f"each failed as the store did not answer: {failed[:3]}"
        assert any("Connection refused" in why for _, why in failed), failed[:3]
        [(entry, attempts)] = Counter(entry for entry, _ in failed).most_common(1)
        assert attempts >= MANY_SWEEPS, f"{entry} failed in only {attempts} upload tasks: not many sweeps"
        assert int(r.hget(schema.COUNTERS, schema.Counter.UPLOADS_FAILED.value) or 0) >= len(failed)
        print(f"{len(failed)} uploads of {len({entry for entry, _ in failed})} sealed files failed during the outage")
        assert server.access_key_secret not in io_log

        docs = [json.loads(v) for v in traffic.values]
        app = docs[0]["app"]
        since, until = min(d["ts"] for d in docs), max(d["ts"] for d in docs) + 1
        result = subprocess.run([sys.executable, "-m", "sluice.cli", "fetch", "--app", app, "--since", str(since),
                                 "--until", str(until)], env=stack.env(), capture_output=True, check=True)
        got = sorted(json.loads(line)["seq"] for line in result.stdout.splitlines())
        assert got == sorted(d["seq"] for d in docs if d["app"] == app)
