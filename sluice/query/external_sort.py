"""`sluice fetch --sort`: an hour's lines in event-time order, with memory bounded."""

from __future__ import annotations

import heapq
import struct
import tempfile
from operator import itemgetter
from typing import BinaryIO, Iterator

from sluice.formats.records import event_time

# At most about this many bytes of lines are kept in memory; more go to sorted runs on disk.
SORT_BUFFER_BYTES = 64 * 1024 * 1024
_RUN_ENTRY = struct.Struct("<dI")  # event time, line length


class HourSorter:
    """The lines of one hour in event-time order: sorted in memory up to SORT_BUFFER_BYTES, in
    sorted runs on disk beyond that, merged at the end. Lines with no event time come first."""

    def __init__(self, field_name: str) -> None:
        self.field = field_name
        self.lines: list[tuple[float, bytes]] = []
        self.size = 0
        self.runs: list[BinaryIO] = []

    def add(self, line: bytes) -> None:
        ts = event_time(line, self.field)
        self.lines.append((-1.0 if ts is None else ts, line))
        self.size += len(line) + 64
        if self.size >= SORT_BUFFER_BYTES:
            self._spill()

    def _spill(self) -> None:
        self.lines.sort(key=itemgetter(0))
        run = tempfile.TemporaryFile()
        for ts, line in self.lines:
            run.write(_RUN_ENTRY.pack(ts, len(line)) + line)
        run.seek(0)
        self.runs.append(run)
        self.lines, self.size = [], 0

    @staticmethod
    def _read_run(run: BinaryIO) -> Iterator[tuple[float, bytes]]:
        with run:
            while head := run.read(_RUN_ENTRY.size):
                ts, length = _RUN_ENTRY.unpack(head)
                yield ts, run.read(length)

    def drain(self) -> Iterator[bytes]:
        self.lines.sort(key=itemgetter(0))
        runs = [self._read_run(run) for run in self.runs]
        for _, line in heapq.merge(*runs, iter(self.lines), key=itemgetter(0)):
            yield line
        self.lines, self.size, self.runs = [], 0, []
