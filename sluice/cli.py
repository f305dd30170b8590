"""The `sluice` command.

Each subcommand imports what it needs when it runs: `sluice status` needs the Kafka client and
Celery, a fetch of five minutes should not wait for them to load."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import threading
from typing import TYPE_CHECKING

from sluice.archive.store import open_store
from sluice.core.settings import Settings, SettingsError, get_settings
from sluice.query.fetch import Fetch, Query, SpoolReader
from sluice.query.timewindow import parse_when
from sluice.query.where import parse_where

if TYPE_CHECKING:
    import redis


def _warn(message: str) -> None:
    print(f"sluice fetch: {message}", file=sys.stderr, flush=True)


def _spool(settings: Settings, follow: bool) -> SpoolReader | None:
    """The spool, if this machine can read it: Redis reachable and the spool directory here.
    Without the directory and without --follow there is nothing to read in it: Redis is not
    even asked (nor its client loaded)."""
    if not follow and not settings.spool_dir.is_dir():
        _warn(f"no spool at {settings.spool_dir} on this machine: records not yet uploaded are not shown, "
              "only what the store has")
        return None
    import redis

    client = _redis(settings)
    try:
        client.ping()
    except redis.RedisError as exc:
        _warn(f"Redis is not reachable ({type(exc).__name__}): records not yet uploaded are "
              "not shown, only what the store has")
        return None
    if not settings.spool_dir.is_dir():  # kept: a starting pipeline creates it in a moment
        _warn(f"no spool at {settings.spool_dir} on this machine (yet): records not yet uploaded "
              "are shown only once it is there")
    return SpoolReader(client, settings.spool_dir, settings.slots_per_app)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice", description="Per-app log archives on object storage.")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="print one app's records in a time window",
                       description="Prints one app's records in a time window, in archive order: "
                                   "uploaded objects and the spool (records not yet uploaded) alike.")
    f.add_argument("--app", required=True, help="app id (or _quarantine)")
    f.add_argument("--since", required=True,
                   help="ISO 8601, epoch seconds, 'now', or an age such as 2h or --since=-90m")
    f.add_argument("--until", help="same formats; default now")
    f.add_argument("--grep", help="only lines matching this regular expression")
    f.add_argument("--follow", "-f", action="store_true",
                   help="after the window, print new matching records as they are committed, until Ctrl-C")
    f.add_argument("--limit", type=int, help="stop after this many matching records")
    f.add_argument("--where", action="append", default=[], metavar="FIELD=VALUE|FIELD~REGEX",
                   help="only JSON records whose FIELD (a key, or keys joined by dots) equals VALUE, or matches "
                        "REGEX; repeat for several, all must hold")
    f.add_argument("--count", action="store_true", help="print only how many records match")
    f.add_argument("--stats", action="store_true",
                   help="then say on stderr what was read: objects, frames listed, skipped by the index and "
                        "read, bytes compressed and decompressed, lines scanned and matched, seconds, MB/s")
    f.add_argument("--sort", action="store_true",
                   help="print in event-time order (parses every line's time; sorts an hour at a time, "
                        "spilling to temporary files beyond 64 MiB); the default is archive order")
    ls = sub.add_parser("ls", help="the apps in the store, or one app's hours: objects, records, bytes",
                        description="From the store's listings and the objects' indexes; nothing is decompressed.")
    ls.add_argument("--app", help="list this app's hours; without it, the apps present")
    ls.add_argument("--since", default="-24h", help="as for fetch; default -24h")
    ls.add_argument("--until", help="as for fetch; default now")
    st = sub.add_parser("status", help="the pipeline on one screen; exit 1 when unhealthy by the thresholds given",
                        description="Lag per topic, ages of what is not yet fetchable and not yet archived, "
                                    "what is in flight and sealed, quarantine, top apps, workers. Exit status: "
                                    "0 healthy, 1 unhealthy by a threshold given, 2 Redis unreachable.")
    st.add_argument("--json", action="store_true", help="print JSON, for scripts")
    st.add_argument("--max-lag-seconds", type=float, help="unhealthy when a topic's lag is older than this")
    st.add_argument("--max-lag-records", type=int, help="unhealthy when a topic lags by more records than this")
    st.add_argument("--max-unarchived-age", type=float,
                    help="unhealthy when the oldest record not yet archived is older than this (seconds)")
    st.add_argument("--min-workers", type=int, help="unhealthy when fewer Celery workers answer a ping")
    st.add_argument("--no-workers", action="store_true", help="do not ping the Celery workers")
    led = sub.add_parser("ledger", help="show the partition marks, or reset a topic's marks",
                         description="The ledger is the mark of each partition: the last offset handed over, "
                                     "below which records from Kafka are dropped as replays.")
    led_sub = led.add_subparsers(dest="action", required=True)
    show = led_sub.add_parser("show", help="every partition's mark")
    show.add_argument("--topic")
    reset = led_sub.add_parser("reset", help="start a new incarnation of a topic's marks (after the topic was "
                                             "recreated): its records are then handed over as new")
    reset.add_argument("--topic", required=True)
    reset.add_argument("--partition", type=int)
    reset.add_argument("--yes", action="store_true", help="do it; without it, only say what would be done")
    args = parser.parse_args(argv)

    try:
        settings = get_settings()
    except SettingsError as exc:
        print(f"sluice: {exc}", file=sys.stderr)
        return 2
    if args.command == "status":
        return _status(args, settings)
    if args.command == "ledger":
        return _ledger(args, settings)
    if args.command == "ls":
        return _ls(args, settings)
    return _fetch(args, settings)


def _redis(settings: Settings) -> redis.Redis:
    from sluice.core.redis_client import client_for

    return client_for(settings.redis_url.get_secret_value(), socket_connect_timeout=2, socket_timeout=5)


def _status(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from sluice.ops import status
    from sluice.ops.status import Thresholds

    thresholds = Thresholds(args.max_lag_seconds, args.max_lag_records, args.max_unarchived_age, args.min_workers)
    try:
        found = status.gather(settings, _redis(settings), thresholds, ask_workers=not args.no_workers)
    except redis.RedisError as exc:
        print(f"sluice status: Redis is not reachable ({type(exc).__name__})", file=sys.stderr)
        return 2
    print(json.dumps(found.as_json(), indent=2) if args.json else status.render(found))
    return 0 if found.healthy else 1


def _ledger(args: argparse.Namespace, settings: Settings) -> int:
    import redis

    from sluice.handover.marks import Marks
    from sluice.ops import ledger_repair

    marks = Marks(_redis(settings))
    try:
        if args.action == "show":
            print(ledger_repair.render(ledger_repair.show(marks, args.topic)))
            return 0
        rows = [r for r in ledger_repair.show(marks, args.topic) if args.partition in (None, r.partition)]
        if not rows:
            print(f"sluice ledger: no mark of {args.topic}"
                  + (f" partition {args.partition}" if args.partition is not None else ""), file=sys.stderr)
            return 1
        if not args.yes:
            print(ledger_repair.render(rows))
            print(f"would start incarnation N+1 of these {len(rows)} partitions: the records of their next "
                  "incarnation are handed over as new from their first offset. Nothing changed: add --yes.")
            return 0
        failed = 0
        for row, done in ledger_repair.reset(marks, rows):
            if done:
                print(f"{row.topic}:{row.partition}: incarnation {row.incarnation + 1} started "
                      f"(mark {row.last} forgotten)")
            else:
                failed += 1
                print(f"{row.topic}:{row.partition}: its mark moved meanwhile (a bridge is handing it over); "
                      "not reset", file=sys.stderr)
        return 1 if failed else 0
    except redis.RedisError as exc:
        print(f"sluice ledger: Redis is not reachable ({type(exc).__name__})", file=sys.stderr)
        return 2


def _ls(args: argparse.Namespace, settings: Settings) -> int:
    from sluice.query import listing

    store = open_store(settings)
    if args.app is None:
        print("\n".join(store.apps()))
        return 0
    try:
        since, until = parse_when(args.since), parse_when(args.until or "now")
        Query(args.app, since, until).check()
    except ValueError as exc:
        print(f"sluice ls: {exc}", file=sys.stderr)
        return 2
    print(listing.render(listing.list_hours(store, args.app, since, until)))
    return 0


def _fetch(args: argparse.Namespace, settings: Settings) -> int:
    try:
        if args.follow and args.until:
            raise ValueError("--follow has no end: leave out --until")
        if args.follow and args.count:
            raise ValueError("--count cannot be used with --follow")
        since = parse_when(args.since)
        until = None if args.follow else parse_when(args.until or "now")
        grep = re.compile(args.grep.encode()) if args.grep else None
        query = Query(args.app, since, until, grep, settings.timestamp_field, args.limit, args.count,
                      args.sort, tuple(parse_where(w) for w in args.where))
        query.check()
    except (ValueError, re.error) as exc:
        _warn(str(exc))
        return 2
    out = sys.stdout.buffer
    job = Fetch(open_store(settings), query, out, _spool(settings, args.follow), _warn)
    try:
        count = job.run()
        if args.follow:
            stop = threading.Event()  # Ctrl-C, or a kill, ends --follow cleanly
            signal.signal(signal.SIGINT, lambda *_: stop.set())
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
            count = job.follow(stop)
        if args.count:
            out.write(b"%d\n" % count)
        out.flush()
    except KeyboardInterrupt:
        return 0 if args.follow else 130
    except BrokenPipeError:  # the reader went away (| head): a normal end
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 0
    if not args.count:
        _warn(f"{count} records")
    if args.stats:
        for line in job.stats.lines():
            _warn(line)
    return 1 if job.damaged else 0


if __name__ == "__main__":
    sys.exit(main())
