"""The one-command demo: a whole pipeline on this machine, sample traffic, archives, a fetch.

Starts its own redis-server and Tansu broker on free ports, an io worker, a cpu worker, Beat,
the bridge and Flower; produces mixed logs of many apps (a few of them bad); waits until all
are archived; prints the objects per app and runs one `sluice fetch`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import redis

from devstack import progress, sample
from devstack.local import FAST_GROUP_JOIN, PROJECT_ROOT, LocalStack, free_port, port_open, start_pipeline, wait_until

BAD_RECORDS = [b'{"msg": "no app id"}', b'{"app": "../../etc", "msg": "path escape"}', b"not json at all"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--apps", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / "data" / "demo")
    parser.add_argument("--keep", action="store_true", help="keep everything running until Ctrl-C")
    args = parser.parse_args(argv)

    shutil.rmtree(args.workdir, ignore_errors=True)
    # Default settings but for a quick group join and files sealed and uploaded within seconds.
    stack = start_pipeline(args.workdir, cpu_concurrency=os.cpu_count() or 2, base_env=FAST_GROUP_JOIN,
                           SLUICE_SEAL_AGE_SECONDS="3", SLUICE_SEAL_OPEN_HOUR_AGE_SECONDS="3",
                           SLUICE_UPLOAD_INTERVAL_SECONDS="2")
    try:
        return _run(stack, args)
    finally:
        stack.close()


def say(text: str) -> None:
    print(text, flush=True)


def _run(stack: LocalStack, args: argparse.Namespace) -> int:
    say(f"redis  {stack.redis_url}\nkafka  {stack.bootstrap} (Tansu)")
    flower_port = 5555 if not port_open(5555) else free_port()
    stack.start_flower(flower_port)
    say(f"flower http://127.0.0.1:{flower_port}\nlogs   {stack.workdir / 'logs'}")

    apps = sample.app_names(args.apps)
    now = time.time()
    values = [v for _, v in sample.lines(args.records, apps, now - 3 * 3600, 3 * 3600,
                                         weights=sample.zipf_weights(len(apps)))]
    values += BAD_RECORDS
    total_bytes = sum(map(len, values))
    say(f"producing {len(values)} records ({total_bytes / 1e6:.1f} MB) of {args.apps} apps "
        f"over the last 3 hours, {len(BAD_RECORDS)} of them bad ...")
    started = time.monotonic()
    sample.produce(stack.bootstrap, "logs", values)
    produced = time.monotonic() - started

    r = redis.Redis.from_url(stack.redis_url)

    def archived() -> bool:
        stack.check_alive()
        return progress.settled(r, len(values))

    wait_until(archived, 900, "the archive to be complete", interval=0.25)
    elapsed = time.monotonic() - started
    say(f"produced in {produced:.1f}s; all archived after {elapsed:.1f}s: "
        f"{len(values) / elapsed:,.0f} records/s, {total_bytes / elapsed / 1e6:.1f} MB/s end to end "
        f"(seal age included)")

    archive = stack.workdir / "archive"
    objects = Counter(p.parts[len(archive.parts)] for p in archive.rglob("*.jsonl.zst"))
    stored = sum(p.stat().st_size for p in archive.rglob("*.jsonl.zst"))
    counts = progress.archived_per_app(r)
    say(f"\n{'app':<16}{'records':>10}{'objects':>9}")
    for app_dir, n in sorted(objects.items(), key=lambda kv: -counts.get(kv[0][4:], 0)):
        say(f"{app_dir[4:]:<16}{counts.get(app_dir[4:], 0):>10}{n:>9}")
    say(f"{len(objects)} apps, {sum(objects.values())} objects, {stored / 1e6:.1f} MB stored "
        f"({total_bytes / max(stored, 1):.1f}x smaller) under {archive}")

    cmd = ["sluice", "fetch", "--app", apps[0], "--since=-30m", "--grep", "ERROR"]
    say(f"\n$ SLUICE_STORE_URL=file://{archive} {' '.join(cmd)} | head -3")
    fetched = subprocess.run([sys.executable, "-m", "sluice.cli", *cmd[1:]], env=stack.env(),
                             capture_output=True, check=True)
    for line in fetched.stdout.splitlines()[:3]:
        say(line.decode())
    say(fetched.stderr.decode().strip())

    if args.keep:
        say("\nrunning; Ctrl-C stops everything")
        try:
            while all(s.alive() for s in stack.services):
                time.sleep(1)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
