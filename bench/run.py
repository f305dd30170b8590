"""Benchmark every stage and the whole pipeline on a 200 MB mixed-app data set.

    .venv/bin/python bench/run.py [--mb 200]

Figures are MB/s and records/s of: bridge consume + hand-over, split, compress + append,
upload to the file store, each also as a ratio to the single-core `zstd -3` CLI on the same
bytes, measured in the same run, because these machines are noisy. Then the whole pipeline
through real Celery workers, against the bare kafka-python consumer reading the same topic in
the same run: MB/s to every record compressed and to every object uploaded, the CPU seconds
per MB of every process (from the kernel's accounting), and Redis's peak memory. Then objects
per app-hour and the compression ratio against gzip -6.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.cpu import group_cpu_seconds  # noqa: E402
from bench.dataset import APPS, dataset, read_lines  # noqa: E402
from bridge.consumer import Bridge  # noqa: E402
from devstack import progress  # noqa: E402
from devstack.hosts import Hosts, why_not  # noqa: E402
from devstack.local import FAST_GROUP_JOIN, LocalStack, fast_settings, start_pipeline, wait_until  # noqa: E402
from devstack.serial_upload import upload_sealed  # noqa: E402
from sluice.archive.store import FileStore  # noqa: E402
from sluice.archive.uploader import Uploader  # noqa: E402
from sluice.core import schema  # noqa: E402
from sluice.core.settings import Settings  # noqa: E402
from sluice.formats.records import Router  # noqa: E402
from sluice.handover.batches import Batches  # noqa: E402
from sluice.handover.split import bundle_pieces, split_batch  # noqa: E402
from sluice.slots.appends import Appender  # noqa: E402
from sluice.slots.compress import compress_pieces  # noqa: E402
from sluice.slots.sealing import Sealer  # noqa: E402

# Files are sealed once idle this long in the end-to-end run (the default is 300 s), and Beat
# sweeps this often (the default is 30 s): short, so the run ends with every object uploaded.
SEAL_AGE_SECONDS = 5.0
UPLOAD_INTERVAL_SECONDS = 5.0


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


def cli_seconds(argv: list[str], path: Path, repeat: int = 3) -> tuple[float, int]:
    """Best wall time of a compressor CLI over the file, and its output size."""
    best, size = float("inf"), 0
    for _ in range(repeat):
        with open(path, "rb") as src:
            start = time.perf_counter()
            out = subprocess.run(argv, stdin=src, capture_output=True, check=True).stdout
            best = min(best, time.perf_counter() - start)
            size = len(out)
    return best, size


def load_topic(bootstrap: str, lines: list[bytes]) -> None:
    """Fill the topic fast with librdkafka (loading is not what is measured)."""
    import confluent_kafka

    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "linger.ms": 50,
                                         "batch.size": 1_000_000, "queue.buffering.max.messages": 1_000_000})
    for line in lines:
        while True:
            try:
                producer.produce("logs", line)
                break
            except BufferError:
                producer.poll(0.05)
    assert producer.flush(60) == 0


def bench_bridge(stack: LocalStack, settings: Settings, r: redis.Redis, total: int) -> float:
    """Seconds per record stream: first to last hand-over, so the group join is not counted."""
    times: list[float] = []
    bridge = Bridge(settings, r, send_split=lambda bid: times.append(time.perf_counter()))
    stop = threading.Event()
    thread = threading.Thread(target=bridge.run, args=(stop,))
    thread.start()
    wait_until(lambda: progress.handed_over(r) >= total, 600, "the bridge to hand everything over", interval=0.05)
    stop.set()
    thread.join()
    first_batch = settings.batch_max_records  # the clock starts at the first hand-over
    return (times[-1] - times[0]) * total / max(total - first_batch, 1)


def stages(workdir: Path, lines: list[bytes], nbytes: int, zstd_s: float) -> None:
    """Each stage on its own, one after the other, in this process: MB/s against the zstd CLI."""
    nrec = len(lines)
    ref = nbytes / zstd_s
    rows: list[tuple[str, float]] = [("zstd -3 CLI, 1 core (reference)", zstd_s)]
    stack = LocalStack(workdir)
    try:
        stack.start_services()
        settings = fast_settings(redis_url=stack.redis_url, kafka_bootstrap=stack.bootstrap,
                                 spool_dir=workdir / "spool", store_url=f"file://{workdir / 'archive'}",
                                 # the bridge runs alone here, nothing drains what it hands over
                                 max_inflight_bytes=nbytes * 2)
        r = redis.Redis.from_url(stack.redis_url)
        batches, appender = Batches(r, settings), Appender(r, settings)

        load_topic(stack.bootstrap, lines)
        rows.append(("bridge: consume + hand-over", bench_bridge(stack, settings, r, nrec)))

        # split: what the split task does with each handed-over batch (payloads are in Redis).
        router = Router(settings.app_id_source, settings.timestamp_field, settings.record_max_bytes)
        bids = [k.decode() for k in r.zrange(schema.INFLIGHT, 0, -1)]

        def split_all() -> None:
            for bid in bids:
                split_batch(batches, router, bid, settings.tail_piece_bytes)
        rows.append(("split: group by app-hour", timed(split_all)[0]))

        import zstandard
        cctx = zstandard.ZstdCompressor(level=settings.zstd_level, write_checksum=True, write_content_size=True)

        def compress_all() -> int:
            """What the compress tasks do, one bundle after the other."""
            return sum(compress_pieces(batches, appender, cctx, bid, bundle) for bid in bids
                       for bundle in bundle_pieces(batches.pending_sizes(bid), settings.compress_bundle_bytes))
        compress_s, pieces = timed(compress_all)
        rows.append((f"compress + append ({pieces:,} pieces)", compress_s))

        def upload_all() -> int:
            Sealer(r, settings).seal_due(now=time.time() + settings.seal_age_seconds + 1)
            return upload_sealed(Uploader(r, settings, FileStore(workdir / "archive")))
        rows.append(("upload to file store", timed(upload_all)[0]))
    finally:
        stack.close()

    print(f"\n{'stage':<40}{'MB/s':>9}{'records/s':>12}{'x zstd CLI':>12}")
    for name, seconds in rows:
        print(f"{name:<40}{nbytes / seconds / 1e6:>9.1f}{nrec / seconds:>12,.0f}{nbytes / seconds / ref:>12.3f}")


def archive_figures(archive: Path, lines: list[bytes]) -> dict[str, float]:
    """Objects per app-hour, and the archive's size against zstd -3 of each app-hour's lines as
    one file (the zstandard library at level 3 with the CLI's checksum: the CLI's very output,
    without 10,000 processes)."""
    import orjson
    import zstandard

    from sluice.formats.records import hour_of

    groups: dict[tuple[str, str], list[bytes]] = {}
    for line in lines:
        doc = orjson.loads(line)
        groups.setdefault((doc["app"], hour_of(doc["ts"])), []).append(line)
    cctx = zstandard.ZstdCompressor(level=3, write_checksum=True)
    reference = sum(len(cctx.compress(b"\n".join(group) + b"\n")) for group in groups.values())
    objects = list(archive.rglob("*.jsonl.zst"))
    per_app_hour = Counter(p.parent for p in objects)
    stored = sum(p.stat().st_size for p in objects)
    return {"app-hours": len(groups), "objects": len(objects),
            "objects per app-hour, max": max(per_app_hour.values()),
            "objects per app-hour, mean": len(objects) / len(per_app_hour),
            "archive size / zstd -3 of each app-hour": stored / reference}


def print_side_by_side(title: str, names: tuple[str, str], left: list[dict[str, float]],
                       right: list[dict[str, float]]) -> None:
    print(f"\n{title:<56}{names[0]:>10}{names[1]:>10}{'ratio':>9}")
    for key in left[0]:
        one = statistics.median(figures[key] for figures in left)
        two = statistics.median(figures[key] for figures in right)
        print(f"{key:<56}{one:>10.4f}{two:>10.4f}{two / one if one else float('nan'):>9.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=200)
    parser.add_argument("--seal-age", type=float, default=SEAL_AGE_SECONDS,
                        help="SLUICE_SEAL_AGE_SECONDS of the end-to-end run")
    parser.add_argument("--upload-interval", type=float, default=UPLOAD_INTERVAL_SECONDS,
                        help="SLUICE_UPLOAD_INTERVAL_SECONDS of the end-to-end run (Beat's sweep)")
    parser.add_argument("--e2e-only", action="store_true", help="skip the stage-by-stage part")
    parser.add_argument("--hosts", action="store_true",
                        help="then the same end to end with the bridge, the io worker and the cpu worker each "
                             "on a host of its own (network namespaces; needs root), side by side")
    parser.add_argument("--apps", type=int, default=None, metavar="N",
                        help=f"then the same end to end over a data set of as many MB Zipf over N apps (a long "
                             f"tail), side by side with the {APPS}-app one")
    parser.add_argument("--runs", type=int, default=1,
                        help="end-to-end runs; with more than one, the median of each figure is printed too "
                             "(these machines are noisy)")
    args = parser.parse_args()

    path = dataset(args.mb)
    lines = read_lines(path)
    nbytes, nrec = path.stat().st_size, len(lines)
    print(f"data set: {path.name}, {nbytes / 1e6:.0f} MB, {nrec:,} records, Zipf over {APPS} apps")

    zstd_s, zstd_size = cli_seconds(["zstd", "-3", "-T1", "-c"], path)
    gzip_s, gzip_size = cli_seconds(["gzip", "-6", "-c"], path, repeat=1)
    work = Path(tempfile.mkdtemp(prefix="sluice-bench-"))
    if not args.e2e_only:
        stages(work / "stages", lines, nbytes, zstd_s)

    runs = [end_to_end(work / f"e2e-{i}", lines, nbytes, args.seal_age, args.upload_interval)
            for i in range(args.runs)]
    if args.hosts:
        if reason := why_not():
            raise SystemExit(reason)
        hosts = Hosts(work / "hosts", ["bridge", "io", "cpu"])
        try:
            apart = [end_to_end(work / f"e2e-hosts-{i}", lines, nbytes, args.seal_age, args.upload_interval, hosts)
                     for i in range(args.runs)]
        finally:
            hosts.close()
        print_side_by_side("one host against separate hosts (median of runs)", ("one", "apart"),
                           [figures for _, figures in runs], [figures for _, figures in apart])
    if args.apps:
        many_path = dataset(args.mb, args.apps)
        many_lines = read_lines(many_path)
        print(f"\ndata set: {many_path.name}, {many_path.stat().st_size / 1e6:.0f} MB, {len(many_lines):,} records, "
              f"Zipf over {args.apps} apps")
        many = [end_to_end(work / f"e2e-{args.apps}apps-{i}", many_lines, many_path.stat().st_size,
                           args.seal_age, args.upload_interval) for i in range(args.runs)]
        print_side_by_side(f"{APPS} apps against {args.apps} apps (median of runs)", (str(APPS), str(args.apps)),
                           [{**figures, **archive_figures(archive, lines)} for archive, figures in runs],
                           [{**figures, **archive_figures(archive, many_lines)} for archive, figures in many])
    if args.runs > 1:
        print(f"\n{'over ' + str(args.runs) + ' end-to-end runs':<56}{'median':>9}{'min':>9}{'max':>9}")
        for key in runs[0][1]:
            values = [figures[key] for _, figures in runs]
            print(f"{key:<56}{statistics.median(values):>9.4f}{min(values):>9.4f}{max(values):>9.4f}")
    archive = runs[-1][0]

    objects = [p for p in archive.rglob("*.jsonl.zst")]
    per_app_hour = Counter(p.parent for p in objects)
    stored = sum(p.stat().st_size for p in objects)
    print(f"\nobjects: {len(objects)} in {len(per_app_hour)} app-hours; per app-hour max "
          f"{max(per_app_hour.values())}, mean {len(objects) / len(per_app_hour):.2f}")
    print(f"compression ratio: sluice {nbytes / stored:.2f}x, zstd -3 whole file {nbytes / zstd_size:.2f}x, "
          f"gzip -6 whole file {nbytes / gzip_size:.2f}x (gzip {gzip_s:.1f}s)")


def bare_consumer(bootstrap: str, records: int, group: str | None) -> dict[str, float]:
    """The reference, in a process of its own, timed like the bridge from the process's start:
    wall seconds to the last record and CPU seconds."""
    start = time.time()
    argv = [sys.executable, str(Path(__file__).parent / "bare_consumer.py"), bootstrap, "logs", str(records)]
    out = subprocess.run(argv + ([group] if group else []), check=True, capture_output=True, text=True,
                         timeout=1800).stdout
    result = json.loads(out.strip().splitlines()[-1])
    return {"wall": result["done"] - start, "cpu": result["cpu"]}


def end_to_end(workdir: Path, lines: list[bytes], nbytes: int, seal_age: float = SEAL_AGE_SECONDS,
               upload_interval: float = UPLOAD_INTERVAL_SECONDS, hosts: Hosts | None = None,
               ) -> tuple[Path, dict[str, float]]:
    """Data waits in Kafka; clock from bridge start to every record compressed, then uploaded.
    With `hosts`, the bridge, the io worker (and Beat) and the cpu worker each run on a host of
    their own. Prints the run's figures; returns the archive and the headline figures."""
    mb = nbytes / 1e6
    bare: dict[str, float] = {}
    unjoined: dict[str, float] = {}

    def fill_and_read_bare(stack: LocalStack) -> None:
        """Data waits in Kafka; the bare consumer reads it all before any sluice process starts."""
        load_topic(stack.bootstrap, lines)
        bare.update(bare_consumer(stack.bootstrap, len(lines), "bench-bare"))
        unjoined.update(bare_consumer(stack.bootstrap, len(lines), None))

    # Defaults but for the sweep (so the run ends with every object uploaded) and the group join.
    placement = {} if hosts is None else {
        "io": hosts["io"].placement(), "beat": hosts["io"].placement(), "cpu0": hosts["cpu"].placement(),
        "bridge": hosts["bridge"].placement()}
    stack = start_pipeline(workdir, bridge=False, base_env=FAST_GROUP_JOIN, before_workers=fill_and_read_bare,
                           address=hosts.gateway if hosts else "127.0.0.1", placement=placement,
                           SLUICE_SEAL_AGE_SECONDS=str(seal_age),
                           SLUICE_UPLOAD_INTERVAL_SECONDS=str(upload_interval))
    try:
        r = redis.Redis.from_url(stack.redis_url)
        services = [s for s in stack.services if s.name != "tansu"]
        # Start-up is not per MB: the workers' and Beat's CPU counts from when they are ready.
        for name, line in (("io", "ready."), ("cpu0", "ready."), ("beat", "beat: Starting")):
            log = stack.service(name).log
            wait_until(lambda line=line, log=log: line in log.read_text(), 120, f"{name} to be ready")
        cpu_before = {s.name: group_cpu_seconds(s.proc.pid) for s in services}
        start = time.perf_counter()
        bridge_on = placement.get("bridge")
        services.append(stack.start_bridge(env=bridge_on.env if bridge_on else None,
                                           wrap=bridge_on.wrap if bridge_on else None))
        cpu_before["bridge"] = 0.0

        milestones: dict[str, float] = {}
        cpu_at: dict[str, float] = {}

        def mark(name: str, reached: bool) -> bool:
            if reached and name not in milestones:
                milestones[name] = time.perf_counter() - start
            return reached

        def done() -> bool:
            stack.check_alive()
            handed = progress.handed_over(r)
            mark("first batch handed over", handed > 0)
            mark("all handed over", handed >= len(lines))
            if mark("all compressed", progress.compressed(r) >= len(lines) and r.zcard(schema.INFLIGHT) == 0) \
                    and not cpu_at:
                cpu_at.update({s.name: group_cpu_seconds(s.proc.pid) - cpu_before[s.name] for s in services})
            return mark("all uploaded", progress.settled(r, len(lines)))
        wait_until(done, 1800, "end-to-end archive", interval=0.05)
        cpu_end = {s.name: group_cpu_seconds(s.proc.pid) - cpu_before[s.name] for s in services}
        peak = int(r.info("memory")["used_memory_peak"])
    finally:
        stack.close()

    print("\nend to end, seconds after the bridge started: "
          + ", ".join(f"{name} {t:.1f}" for name, t in milestones.items()))
    bare_rate = mb / bare["wall"]
    print(f"\n{'end to end, from process start':<52}{'MB/s':>9}{'x bare client':>15}")
    print(f"{'bare kafka-python consumer in a group (reference)':<52}{bare_rate:>9.1f}{1:>15.3f}")
    print(f"{'  the same without a group (no join delay)':<52}{mb / unjoined['wall']:>9.1f}"
          f"{bare['wall'] / unjoined['wall']:>15.3f}")
    for name in ("all compressed", "all uploaded"):
        rate = mb / milestones[name]
        print(f"{'bridge start to ' + name:<52}{rate:>9.1f}{rate / bare_rate:>15.3f}")
    steady = mb / (milestones["all compressed"] - milestones["first batch handed over"])
    print(f"{'first hand-over to all compressed (steady part)':<52}{steady:>9.1f}{steady / bare_rate:>15.3f}")

    print(f"\n{'CPU seconds per MB':<40}{'to compressed':>15}{'to uploaded':>13}")
    print(f"{'bare kafka-python consumer (reference)':<40}{bare['cpu'] / mb:>15.4f}{'':>13}")
    for s in services:
        print(f"{s.name:<40}{cpu_at[s.name] / mb:>15.4f}{cpu_end[s.name] / mb:>13.4f}")
    print(f"{'all of sluice and redis-server':<40}{sum(cpu_at.values()) / mb:>15.4f}"
          f"{sum(cpu_end.values()) / mb:>13.4f}")
    print(f"\nRedis peak memory: {peak / 1e6:.1f} MB")
    headline = {"bare kafka-python consumer, CPU-s/MB": bare["cpu"] / mb,
                "all of sluice and redis-server to compressed, CPU-s/MB": sum(cpu_at.values()) / mb,
                "the same to uploaded, CPU-s/MB": sum(cpu_end.values()) / mb,
                **{f"  {name} to compressed, CPU-s/MB": cpu / mb for name, cpu in cpu_at.items()},
                "end to end to compressed, x bare consumer": mb / milestones["all compressed"] / bare_rate,
                "Redis peak memory, MB": peak / 1e6}
    return workdir / "archive", headline


if __name__ == "__main__":
    main()
