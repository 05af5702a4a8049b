"""Atomic output: every file we write appears whole or not at all.

Writers produce into a temporary file in the destination directory (so the final rename never
crosses a filesystem) and replace the target only after the data is flushed to disk. An interrupted
run therefore leaves the previous good file in place.
"""
from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import IO, Iterator

from .errors import AlchemyError


class OutputIsAFolder(AlchemyError, IsADirectoryError):
    """The output path names an existing folder. Also an ``OSError``, so callers that skip unwritable
    files keep doing so, while the CLI shows the message instead of a traceback."""


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once: os.umask can only be read by setting it, which would race with other threads' file creation.
_UMASK = _read_umask()


# The names atomic_path's mkstemp call makes: ".<target name>." + 8 characters of its alphabet + ".tmp".
_LEFTOVER = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")
STALE_AFTER_S = 600.0
"""A temporary file untouched this long belongs to a save that was killed (a live one keeps writing)."""


def remove_leftovers(folder: str | os.PathLike, *, recursive: bool = False,
                     stale_after_s: float = STALE_AFTER_S) -> list[Path]:
    """Delete the temporary files a killed save left in `folder` (only names :func:`atomic_path` makes,
    only regular files not modified for `stale_after_s`); returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    walker = os.walk(folder) if recursive else [(str(folder), [], os.listdir(folder))]
    for root, _dirs, files in walker:
        for name in files:
            path = Path(root, name)
            if not _LEFTOVER.match(name) or path.is_symlink() or not path.is_file():
                continue
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime >= stale_after_s:
                    path.unlink()
                    removed.append(path)
    return removed


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success it is renamed over `target`."""
    target = Path(target)
    if target.is_dir():      # checked first: the rename would fail only after all the work was done
        raise OutputIsAFolder("is a folder, not a file", target, "give a file name for the output")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp makes 0600 files; outputs should get the permissions a plain open() would give.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


@contextlib.contextmanager
def atomic_open(target: str | os.PathLike, mode: str = "wb", encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file for writing that replaces `target` when the block ends without error."""
    if "b" not in mode and encoding is None:
        encoding = "utf-8"
    with atomic_path(target) as tmp:
        with open(tmp, mode, encoding=encoding) as fh:
            yield fh


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_open(target, "w") as fh:
        fh.write(text)


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    with atomic_open(target, "wb") as fh:
        fh.write(data)
