"""Benchmark the upload sweep: today's serial sweep against the fan-out of one task per file.

    .venv/bin/python bench/upload.py [--files 2000] [--latency 0.05] [--threads 16]

Against the OSS test server (tests/oss_server.py, its own process) with `--latency` seconds added
to every request, as a store that far away would: `--files` sealed slot files of one small
frame each (one app-hour each), archived first by `upload_sealed` one after the other in this
process (what the Beat task did before), then, after sealing as many again, by the Beat sweep's
fan-out: one `sluice.upload_app_hour` task per file (each its own app-hour) on an io worker with `--threads` threads.
Printed: objects/s and MB/s of each, and the ratio.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack.local import LocalStack, free_port, port_open, wait_until  # noqa: E402
from devstack.serial_upload import upload_sealed  # noqa: E402
from sluice.archive.store import open_store  # noqa: E402
from sluice.archive.uploader import Uploader  # noqa: E402
from sluice.core import schema  # noqa: E402
from sluice.core.settings import Settings  # noqa: E402
from sluice.handover.batches import Batches  # noqa: E402
from sluice.slots.appends import Appender  # noqa: E402
from sluice.slots.compress import compress_pieces  # noqa: E402
from sluice.slots.sealing import Sealer  # noqa: E402

BUCKET, KEY_ID, SECRET = "bench", "bench-key-id", "bench-key-secret"


def seal_files(settings: Settings, r: redis.Redis, count: int, first_hour: int) -> int:
    """`count` sealed files, one per app-hour; returns their bytes."""
    batches, appender = Batches(r, settings), Appender(r, settings)
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True, write_content_size=True)
    for i in range(count):
        app, hour = f"app-{i % 100:03d}", time.strftime("%Y%m%d%H", time.gmtime((first_hour + i // 100) * 3600))
        piece, bid = schema.app_hour(app, hour), f"bench:{first_hour}:{i}-{i}"
        data = b"".join(b'{"app":"%s","n":%d,"pad":"%s"}\n' % (app.encode(), n, os.urandom(24).hex().encode())
                        for n in range(100))
        r.set(schema.batch_state(bid), schema.BatchState.HANDED.value)
        batches.commit_split(bid, {piece: data})
        compress_pieces(batches, appender, cctx, bid, [piece])
    Sealer(r, settings).seal_due(now=4_000_000_000.0)
    return sum(int(size) for size in r.hgetall(schema.SEALED).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--latency", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=16)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="sluice-upload-bench-"))
    oss_port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "tests.oss_server", "--port", str(oss_port), "-b", BUCKET,
                               "--access-key-id", KEY_ID, "--access-key-secret", SECRET,
                               "--latency", str(args.latency)], stdout=subprocess.DEVNULL)
    env = {"SLUICE_STORE_URL": f"oss://{BUCKET}/archive", "SLUICE_OSS_ENDPOINT": f"http://127.0.0.1:{oss_port}",
           "SLUICE_OSS_ACCESS_KEY_ID": KEY_ID, "SLUICE_OSS_ACCESS_KEY_SECRET": SECRET,
           "SLUICE_UPLOAD_INTERVAL_SECONDS": "1"}
    stack = LocalStack(work, env)
    try:
        wait_until(lambda: port_open(oss_port), 30, "the OSS test server")
        stack.start_redis()
        r = redis.Redis.from_url(stack.redis_url)
        settings = Settings.load(redis_url=stack.redis_url, spool_dir=work / "spool", store_url=env["SLUICE_STORE_URL"],
                            oss_endpoint=env["SLUICE_OSS_ENDPOINT"], oss_access_key_id=KEY_ID,
                            oss_access_key_secret=SECRET)
        rows = []

        nbytes = seal_files(settings, r, args.files, first_hour=480_000)
        start = time.perf_counter()
        upload_sealed(Uploader(r, settings, open_store(settings)))
        rows.append(("serial sweep (one task, one file after another)", time.perf_counter() - start, nbytes))

        nbytes = seal_files(settings, r, args.files, first_hour=490_000)
        stack.start_io_worker(concurrency=args.threads)
        wait_until(lambda: "ready." in stack.service("io").log.read_text(), 120, "the io worker")
        start = time.perf_counter()
        stack.start_beat()  # its first tick sweeps: one upload_app_hour task per sealed file
        wait_until(lambda: r.hlen(schema.SEALED) == 0, 1800, "every file archived", interval=0.05)
        rows.append((f"fan-out, one task per file, {args.threads} io threads", time.perf_counter() - start, nbytes))
    finally:
        stack.close()
        server.terminate()
        server.wait(30)

    print(f"\n{args.files} sealed files ({rows[0][2] / args.files / 1e3:.1f} kB each), "
          f"{args.latency * 1000:.0f} ms added to every OSS request")
    print(f"{'upload':<52}{'s':>8}{'objects/s':>11}{'MB/s':>8}{'x serial':>10}")
    for name, seconds, size in rows:
        print(f"{name:<52}{seconds:>8.1f}{args.files / seconds:>11.1f}{size / seconds / 1e6:>8.2f}"
              f"{rows[0][1] / seconds:>10.2f}")


if __name__ == "__main__":
    main()
