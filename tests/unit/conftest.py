"""Fixtures shared by the unit tests."""

import time

import pytest


@pytest.fixture
def non_utc_local_time(monkeypatch):
    """Make the process's local zone UTC-5 so naive datetimes can't pass as UTC by accident."""
    monkeypatch.setenv("TZ", "EST+05")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()
