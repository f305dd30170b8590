"""CPU seconds the benchmark's processes used, from the kernel's own accounting (/proc).

Every service of a LocalStack runs in a process group of its own, so a service's cost is the
user + system time of each live process in its group plus what its reaped children used
(a prefork worker's children included).
"""

from __future__ import annotations

import os

_TICKS = os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(pgid: int) -> float:
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue  # exited meanwhile
        fields = stat[stat.rindex(")") + 2:].split()  # from field 3 (state) on
        if int(fields[2]) == pgid:  # field 5: process group
            total += sum(int(x) for x in fields[11:15])  # fields 14-17: utime stime cutime cstime
    return total / _TICKS
