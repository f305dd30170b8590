"""--where field filters, and finding the lines that can match by searching a whole block."""

from __future__ import annotations

import re
import subprocess
import sys

import orjson
import pytest

from sluice.query.where import Filters, lines_containing, lines_matching, parse_where

LINES = [orjson.dumps(d) for d in (
    {"app": "billing", "level": "ERROR", "status": 500, "http": {"path": "/pay"}, "msg": "card declined"},
    {"app": "billing", "level": "INFO", "status": 200, "http": {"path": "/pay"}, "msg": "ok ERROR-free"},
    {"app": "billing", "level": "ERROR", "status": 502, "msg": 'upstream "timeout"'},
    {"app": "billing", "ok": True, "level": "WARN"},
)]
BLOCK = b"\n".join(LINES) + b"\n"


def kept(*expressions: str) -> list[int]:
    filters = Filters(tuple(parse_where(e) for e in expressions))
    return [i for i, line in enumerate(LINES) if filters.holds(line)]


def test_equality_compares_strings_as_they_are_and_other_values_as_their_json():
    assert kept("level=ERROR") == [0, 2]
    assert kept("status=500") == [0]
    assert kept("ok=true") == [3]
    assert kept("http.path=/pay") == [0, 1], "a path of keys"
    assert kept("level=ERROR", "status=502") == [2], "all must hold"
    assert kept("missing=x") == []


def test_a_regex_matches_anywhere_in_the_field():
    assert kept("msg~time(out)?") == [2]
    assert kept("status~^50") == [0, 2]


def test_the_literal_is_the_longest_value_json_writes_unescaped():
    assert Filters((parse_where("level=ERROR"), parse_where("status=502"))).literal == b"ERROR"
    assert parse_where('msg=say "hi"').literal is None, "JSON escapes the quotes"
    assert parse_where("msg~x").literal is None


@pytest.mark.parametrize("bad", ["level", "=ERROR", "a.=b", "level~(", ""])
def test_a_malformed_expression_is_refused(bad):
    with pytest.raises(ValueError, match="--where"):
        parse_where(bad)


def test_a_malformed_expression_is_one_line_and_exit_2():
    result = subprocess.run([sys.executable, "-m", "sluice.cli", "fetch", "--app", "billing", "--since=-1h",
                             "--where", "level"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "FIELD=VALUE" in result.stderr


def test_lines_containing_a_literal_are_found_in_the_block():
    assert lines_containing(BLOCK, b"ERROR") == [LINES[0], LINES[1], LINES[2]]
    assert lines_containing(BLOCK, b"nowhere") == []


@pytest.mark.parametrize("pattern", [rb"ERROR", rb"^\{", rb"50\d", rb"declined$", rb"pay\W\W", rb"x*",
                                     rb"\}\n\{"])
def test_lines_matching_a_pattern_are_the_ones_a_line_by_line_search_finds(pattern):
    compiled = re.compile(pattern)
    assert lines_matching(BLOCK, compiled) == [line for line in LINES if compiled.search(line)]
