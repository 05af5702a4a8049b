"""Atomic writes: a failed write leaves the previous file untouched and no temp files behind."""
from __future__ import annotations

import pytest

from extensions_lib.atomic import atomic_open, write_bytes, write_text


def test_write_replaces_whole_file(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    write_text(target, "first")
    write_text(target, "second ✓")
    assert target.read_text(encoding="utf-8") == "second ✓"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_failure_keeps_previous_content(tmp_path):
    target = tmp_path / "out.bin"
    write_bytes(target, b"good")
    with pytest.raises(RuntimeError):
        with atomic_open(target, "wb") as fh:
            fh.write(b"partial")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"good"
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_permissions_follow_umask(tmp_path):
    from extensions_lib import atomic

    write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o666 & ~atomic._UMASK
