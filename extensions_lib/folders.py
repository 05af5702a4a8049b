"""Folders given by the user: one that turns out to be a file is a clear message naming it, not a
FileExistsError from mkdir or an "unknown name" from an empty listing."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import AlchemyError


def check_folder(path: str | os.PathLike, what: str, *, must_exist: bool = False) -> Path:
    """`path` when it is a folder, or (unless `must_exist`) absent with only folders above it."""
    path = Path(path)
    for candidate in (path, *path.parents):
        if candidate.exists() or candidate.is_symlink():
            if not candidate.is_dir():
                where = "" if candidate == path else f" (it would be inside {candidate}, a file)"
                raise AlchemyError(f"{what} is not a folder{where}", path, f"give {what} a folder, not a file")
            break
    if must_exist and not path.is_dir():
        raise AlchemyError(f"{what} not found", path, f"create it, or give {what} an existing folder")
    return path
