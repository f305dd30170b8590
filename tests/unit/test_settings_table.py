"""docs/operating.md's Settings table is the settings: one row per `Settings` field, each with the
default that field has, written as the environment value that gives it."""

from __future__ import annotations

import os
import re
import types
import typing
from pathlib import Path

import msgspec
import pytest

from sluice.core.settings import ENV_PREFIX, Secret, Settings

DOC = Path(__file__).resolve().parents[2] / "docs" / "operating.md"
ROW = re.compile(r"^\|\s*`(?P<var>[A-Z0-9_]+)`\s*\|\s*(?:`(?P<default>[^`]*)`)?\s*\|")
FIELDS = {ENV_PREFIX + field.name.upper(): field for field in msgspec.structs.fields(Settings)}


def documented() -> list[tuple[str, str]]:
    """(variable, default) of each row of the table under "## Settings", in order; an empty
    default cell is ""."""
    text = DOC.read_text()
    assert "\n## Settings\n" in text, f"{DOC} has no section '## Settings'"
    section = text.split("\n## Settings\n", 1)[1].split("\n#", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    assert rows, f"no table under '## Settings' in {DOC}"
    parsed = []
    for line in rows:
        match = ROW.match(line)
        assert match, f"{DOC.name}: a row not of the form | `VARIABLE` | `default` or nothing | meaning |: {line}"
        parsed.append((match["var"], match["default"] or ""))
    return parsed


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in list(os.environ):
        if name.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def test_one_row_per_setting():
    variables = [var for var, _ in documented()]
    repeated = sorted({var for var in variables if variables.count(var) > 1})
    assert not repeated, f"documented more than once in {DOC.name}: {repeated}"
    missing = sorted(set(FIELDS) - set(variables))
    unknown = sorted(set(variables) - set(FIELDS))
    assert not missing, f"{DOC.name}'s Settings table has no row for {missing}"
    assert not unknown, f"{DOC.name}'s Settings table documents {unknown}, which Settings does not have"


def shown(value: object) -> str:
    """A value for a failure message; a Secret's default is no secret (it is in the source)."""
    return f"Secret({value.get_secret_value()!r})" if isinstance(value, Secret) else repr(value)


def admits_none(kind: object) -> bool:
    return typing.get_origin(kind) in (typing.Union, types.UnionType) and type(None) in typing.get_args(kind)


def test_documented_defaults_are_the_defaults(monkeypatch):
    """Each default, set as its variable and read by `Settings.load()` as a process reads it,
    gives the field's default (an empty cell of an optional setting means unset: None)."""
    wrong = []
    for var, text in documented():
        field = FIELDS.get(var)
        if field is None:
            continue  # test_one_row_per_setting names it
        if text == "" and admits_none(field.type):
            value = None
        else:
            with monkeypatch.context() as env:
                env.setenv(var, text)
                try:
                    value = getattr(Settings.load(), field.name)
                except ValueError as exc:
                    wrong.append(f"{var}: documented {text!r} is not a valid value ({exc})")
                    continue
        if value != field.default or type(value) is not type(field.default):
            wrong.append(f"{var}: documented {text!r} gives {shown(value)}, but the default is {shown(field.default)}")
    assert not wrong, f"{DOC.name}'s Settings table has wrong defaults:\n" + "\n".join(wrong)
