"""The `sluice` command."""

from __future__ import annotations

import argparse
import re
import sys

from sluice.fetch import fetch, parse_when
from sluice.settings import get_settings
from sluice.store import open_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="sluice", description="Per-app log archives on object storage.")
    sub = parser.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="print one app's records in a time window")
    f.add_argument("--app", required=True, help="app id (or _quarantine)")
    f.add_argument("--since", required=True, help="ISO 8601, epoch seconds, 'now', or an age such as 2h or --since=-90m")
    f.add_argument("--until", default="now", help="same formats; default now")
    f.add_argument("--grep", help="only lines matching this regular expression")
    args = parser.parse_args(argv)

    settings = get_settings()
    try:
        since, until = parse_when(args.since), parse_when(args.until)
        grep = re.compile(args.grep.encode()) if args.grep else None
        out = sys.stdout.buffer
        count = fetch(open_store(settings), args.app, since, until, out, grep, settings.timestamp_field)
        out.flush()
    except (ValueError, re.error) as exc:
        print(f"sluice fetch: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    print(f"sluice fetch: {count} records", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
