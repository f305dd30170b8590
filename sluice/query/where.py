"""`sluice fetch --where`: field filters on JSON records, and the literal that finds the lines
that could match without parsing the others.

`FIELD=VALUE` keeps a record whose field equals VALUE: a string field as it is, any other value
as its JSON text (`status=500`, `ok=true`). `FIELD~REGEX` keeps one whose field (the same text)
matches the regular expression anywhere. FIELD is a top-level key, or a path of keys joined by
dots (`http.status`). Several filters must all hold.

A line is parsed only if it contains the longest literal any `=` filter needs to see in its raw
JSON (the value itself, when JSON writes it unescaped): in an incident query most lines do not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

_EXPRESSION = re.compile(r"(?P<field>[^=~]+)(?P<op>[=~])(?P<value>.*)", re.DOTALL)


@dataclass(frozen=True)
class Where:
    path: tuple[str, ...]
    op: str  # "=" or "~"
    value: str
    pattern: re.Pattern[str] | None = None

    def holds(self, doc: Any) -> bool:
        for key in self.path:
            if not isinstance(doc, dict) or key not in doc:
                return False
            doc = doc[key]
        text = doc if isinstance(doc, str) else orjson.dumps(doc).decode()
        if self.pattern is not None:
            return self.pattern.search(text) is not None
        return text == self.value

    @property
    def literal(self) -> bytes | None:
        """Bytes every raw line that matches must contain, if there are such."""
        if self.op != "=" or not self.value or any(c in self.value for c in '"\\') or \
                any(ord(c) < 0x20 for c in self.value):
            return None
        return self.value.encode()


def parse_where(expression: str) -> Where:
    """A filter from `FIELD=VALUE` or `FIELD~REGEX`; ValueError saying what is wrong."""
    found = _EXPRESSION.fullmatch(expression)
    if found is None:
        raise ValueError(f"--where {expression!r}: expected FIELD=VALUE or FIELD~REGEX")
    field_text, op, value = found["field"], found["op"], found["value"]
    path = tuple(field_text.split("."))
    if any(not key.strip() for key in path):
        raise ValueError(f"--where {expression!r}: the field name is empty")
    pattern = None
    if op == "~":
        try:
            pattern = re.compile(value)
        except re.error as exc:
            raise ValueError(f"--where {expression!r}: not a regular expression ({exc})") from None
    return Where(path, op, value, pattern)


class Filters:
    """All the --where filters of a query."""

    def __init__(self, wheres: tuple[Where, ...]) -> None:
        self.wheres = wheres
        literals = [w.literal for w in wheres if w.literal is not None]
        self.literal = max(literals, key=len) if literals else None

    def __bool__(self) -> bool:
        return bool(self.wheres)

    def holds(self, line: bytes) -> bool:
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            return False
        return all(w.holds(doc) for w in self.wheres)


def lines_containing(data: bytes, needle: bytes) -> list[bytes]:
    """The lines of newline-terminated `data` that contain `needle`, in order, found by searching
    the whole block (C speed) rather than line by line."""
    out: list[bytes] = []
    at = data.find(needle)
    while at >= 0:
        start = data.rfind(b"\n", 0, at) + 1
        end = data.find(b"\n", at)
        out.append(data[start:end])
        at = data.find(needle, end + 1)
    return out


def lines_matching(data: bytes, pattern: re.Pattern[bytes]) -> list[bytes]:
    """The lines of newline-terminated `data` in which `pattern` matches, in order. The pattern
    runs over the whole block once; one with anchors (`^`, `$`, `\\A`, `\\Z`), or a block where
    a match spans a line break, is run line by line instead."""
    if any(anchor in pattern.pattern for anchor in (b"^", b"$", b"\\A", b"\\Z")):
        return _line_by_line(data, pattern)
    out: list[bytes] = []
    end = -1
    for found in pattern.finditer(data):
        if found.start() == len(data):
            break  # an empty match past the last line
        if b"\n" in data[found.start():found.end()]:
            return _line_by_line(data, pattern)
        if found.start() <= end:
            continue  # another match in a line already taken
        start = data.rfind(b"\n", 0, found.start()) + 1
        end = data.find(b"\n", found.start())
        out.append(data[start:end])
    return out


def _line_by_line(data: bytes, pattern: re.Pattern[bytes]) -> list[bytes]:
    return [line for line in data.split(b"\n")[:-1] if pattern.search(line)]
