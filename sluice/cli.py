"""The `sluice` command."""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
import threading

import redis

from sluice.fetch import Fetch, Query, SpoolReader
from sluice.settings import Settings, get_settings
from sluice.store import open_store
from sluice.timewindow import parse_when


def _warn(message: str) -> None:
    print(f"sluice fetch: {message}", file=sys.stderr, flush=True)


def _spool(settings: Settings) -> SpoolReader | None:
    """The spool, if this machine can read it: Redis reachable and the spool directory here."""
    client = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_connect_timeout=2,
                                  socket_timeout=5)
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
    f.add_argument("--count", action="store_true", help="print only how many records match")
    f.add_argument("--sort", action="store_true",
                   help="print in event-time order (parses every line's time; sorts an hour at a time, "
                        "spilling to temporary files beyond 64 MiB); the default is archive order")
    args = parser.parse_args(argv)

    settings = get_settings()
    try:
        if args.follow and args.until:
            raise ValueError("--follow has no end: leave out --until")
        if args.follow and args.count:
            raise ValueError("--count cannot be used with --follow")
        since = parse_when(args.since)
        until = None if args.follow else parse_when(args.until or "now")
        grep = re.compile(args.grep.encode()) if args.grep else None
        query = Query(args.app, since, until, grep, settings.timestamp_field, args.limit, args.count,
                      args.sort)
        query.check()
    except (ValueError, re.error) as exc:
        _warn(str(exc))
        return 2
    out = sys.stdout.buffer
    job = Fetch(open_store(settings), query, out, _spool(settings), _warn)
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
    return 1 if job.damaged else 0


if __name__ == "__main__":
    sys.exit(main())
