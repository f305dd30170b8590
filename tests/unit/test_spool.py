"""The spool's flush: one syncfs per filesystem where the kernel reports writeback errors from
it, fsync per file elsewhere; both must leave what was written readable and raise on failure."""

from __future__ import annotations

import os

import pytest

from sluice.formats import spool


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync"])
def test_make_durable_flushes_new_files_in_new_directories(tmp_path, monkeypatch, syncfs):
    if not syncfs:
        monkeypatch.setattr(spool, "_libc", None)
    elif spool._libc is None:
        pytest.skip("this kernel's syncfs does not report writeback errors")
    paths = [tmp_path / "open" / f"app{i}" / "2026010100" / "f.jsonl.zst" for i in range(3)]
    with spool.locked_file(paths[0], create=True) as a, spool.locked_file(paths[1], create=True) as b, \
            spool.locked_file(paths[2], create=True) as c:
        ends = [spool.write_at(fd, f"frame {i}".encode(), 0) for i, fd in enumerate((a, b, c))]
        spool.make_durable([a, b, c])
    assert ends == [7, 7, 7]
    assert [p.read_bytes() for p in paths] == [b"frame 0", b"frame 1", b"frame 2"]


@pytest.mark.parametrize("syncfs", [True, False], ids=["syncfs", "fsync"])
def test_make_durable_raises_rather_than_pass_over_a_file(tmp_path, monkeypatch, syncfs):
    if not syncfs:
        monkeypatch.setattr(spool, "_libc", None)
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT)
    os.close(fd)
    with pytest.raises(OSError):
        spool.make_durable([fd])


@pytest.mark.parametrize("release, expected", [("6.1.0-28-amd64", True), ("5.8.0", True),
                                               ("5.4.0-150-generic", False), ("4.19.91-27.al7.x86_64", False),
                                               ("weird", False)])
def test_syncfs_is_trusted_from_linux_5_8(monkeypatch, release, expected):
    monkeypatch.setattr(spool.sys, "platform", "linux")
    monkeypatch.setattr(spool.os, "uname", lambda: os.uname_result(("Linux", "h", release, "#1", "x86_64")))
    assert spool._syncfs_reports_errors() is expected
