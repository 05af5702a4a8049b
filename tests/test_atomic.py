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


def test_output_that_is_a_folder_is_a_named_error_and_the_folder_is_kept(tmp_path):
    from extensions_lib.errors import AlchemyError

    folder = tmp_path / "out.png"
    folder.mkdir()
    (folder / "keep.txt").write_text("x")
    with pytest.raises(AlchemyError) as err:
        write_bytes(folder, b"data")
    assert err.value.path == str(folder) and "folder" in err.value.message and err.value.fix
    assert isinstance(err.value, OSError)  # callers that skip unwritable files still catch it
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]
    assert [p.name for p in folder.iterdir()] == ["keep.txt"]
