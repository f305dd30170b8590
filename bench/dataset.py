"""The benchmark data set: mixed-app JSON log lines, Zipf over 200 apps (or any number: a long
tail), 150-400 bytes each.

Written once to data/bench/dataset-<MB>-fixed.jsonl (200 apps) or dataset-<MB>-<N>apps.jsonl
(deterministic seed), then reused. Event
times lie in two fixed hours long past (START), so every hour of the data is over whenever
the bench runs: no run waits out the open-hour seal age because of the time of day.
"""

from __future__ import annotations

import sys
from pathlib import Path

from devstack import sample
from devstack.local import PROJECT_ROOT

APPS = 200
START = 1_767_225_600.0  # 2026-01-01T00:00:00Z


def dataset(megabytes: int = 200, apps: int = APPS) -> Path:
    name = f"dataset-{megabytes}-fixed.jsonl" if apps == APPS else f"dataset-{megabytes}-{apps}apps.jsonl"
    path = PROJECT_ROOT / "data" / "bench" / name
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    target = megabytes * 1_000_000
    names = sample.app_names(apps)
    # 275 bytes on average; generate a little more than needed and stop at the target.
    count = target // 250
    written = 0
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as out:
        for _, line in sample.lines(count, names, START, 2 * 3600, seed=2026,
                                    weights=sample.zipf_weights(apps)):
            out.write(line + b"\n")
            written += len(line) + 1
            if written >= target:
                break
    tmp.replace(path)
    return path


def read_lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines()


if __name__ == "__main__":
    print(dataset(int(sys.argv[1]) if len(sys.argv) > 1 else 200, int(sys.argv[2]) if len(sys.argv) > 2 else APPS))
