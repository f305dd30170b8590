"""Plain-text logs whose app id travels in a Kafka header, batches claim-checked on the spool."""

from __future__ import annotations

import json
import subprocess

import pytest

from devstack.local import start_pipeline
from tests.integration.conftest import read_archive, wait_archived
from tests.integration.kcat import kcat_env

pytestmark = pytest.mark.integration


def kcat_lines(stack, lines: list[bytes], *headers: str) -> None:
    """kcat -P sends each stdin line as one message."""
    args = ["kcat", "-P", "-b", stack.bootstrap, "-t", "logs"]
    for header in headers:
        args += ["-H", header]
    subprocess.run(args, input=b"\n".join(lines) + b"\n", env=kcat_env(stack.workdir),
                   check=True, capture_output=True, timeout=60)


def test_header_app_ids_and_spool_claim_check(tmp_path):
    stack = start_pipeline(tmp_path / "stack", partitions=3,
                           SLUICE_APP_ID_SOURCE="header:app", SLUICE_CLAIM_CHECK="spool")
    try:
        web = [f"GET /item/{i} 200 {i}ms".encode() for i in range(500)]
        db = [f"slow query #{i} took {i * 3}ms".encode() for i in range(300)]
        orphans = [b"a line without an app header", b"another one"]
        kcat_lines(stack, web, "app=web")
        kcat_lines(stack, db, "app=db.primary")
        kcat_lines(stack, orphans)
        kcat_lines(stack, [b"header says escape"], "app=../../x")
        wait_archived(stack, len(web) + len(db) + len(orphans) + 1, timeout=120)

        by_app: dict[str, list[bytes]] = {}
        for obj, line in read_archive(stack.workdir / "archive"):
            by_app.setdefault(obj.parts[-4], []).append(line)
        assert sorted(by_app["app=web"]) == sorted(web)
        assert sorted(by_app["app=db.primary"]) == sorted(db)
        reasons = sorted(json.loads(line)["reason"] for line in by_app["app=_quarantine"])
        assert reasons == ["bad_app_id", "missing_app_id", "missing_app_id"]
        assert set(by_app) == {"app=web", "app=db.primary", "app=_quarantine"}
        # Claim-checked batch files are removed once split.
        assert not list((stack.workdir / "spool" / "batches").glob("*.kafka"))
        assert (stack.workdir / "spool" / "batches").is_dir()
    finally:
        stack.close()
