"""The one check for every name that becomes part of a path (embedding, hypernetwork, log folder, preview,
snapshot, API request names).

Names typed by users, sent in API requests or read from inside files (an embedding image's JSON ``name``, a
``.pt``'s ``name`` field) are untrusted: joined to a folder unchecked, ``../../x`` or ``/etc/x`` would write
outside it. A valid name is exactly one path component that stays inside its folder on every system the WebUI
runs on. It is deliberately lenient otherwise (spaces, brackets, unicode are fine), so every file the host
lists can still be trained; creating new files uses the stricter
:func:`extensions_lib.embeddings.create.check_name` on top of this.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import AlchemyError

MAX_NAME_BYTES = 200
"""Room for suffixes such as ``-100000.pt.optim`` within the usual 255-byte file-name limit."""

_SEPARATORS = ("/", "\\")


def name_problem(name: object) -> str | None:
    """Why `name` cannot be one path component inside a folder, or None when it can."""
    if not isinstance(name, str):
        return f"is a {type(name).__name__}, not text"
    if not name.strip():
        return "is empty"
    if name in (".", ".."):
        return "would name the folder itself or its parent"
    bad = sorted({ch for ch in name if ch in _SEPARATORS or ord(ch) < 32 or ord(ch) == 127})
    if bad:
        return f"contains {', '.join(map(repr, bad))}, which a single file name cannot hold"
    if len(name) >= 2 and name[1] == ":" and name[0].isalpha():
        return "starts with a drive letter"
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        return "is not valid text (it holds an unpaired surrogate)"
    if size > MAX_NAME_BYTES:
        return f"is {size} bytes long; at most {MAX_NAME_BYTES} fit in a file name"
    return None


def is_valid_name(name: object) -> bool:
    return name_problem(name) is None


def check_name(name: object, what: str = "name", fix: str | None = None) -> str:
    """`name` when it is a safe single path component; AlchemyError saying why not otherwise."""
    problem = name_problem(name)
    if problem is not None:
        raise AlchemyError(f"{what} {name!r} {problem}; refused so that no file is written outside its folder",
                           fix=fix or "use a plain name such as 'my-style' (letters, digits, '-', '_', '.', spaces)")
    return name


def child_path(folder: str | os.PathLike, name: str, what: str = "name", suffix: str = "") -> Path:
    """``folder / (name + suffix)`` after checking `name`; the result is always directly inside `folder`."""
    check_name(name, what)
    path = Path(folder) / f"{name}{suffix}"
    if path.parent != Path(folder):  # belt and braces: the checks above should make this impossible
        raise AlchemyError(f"{what} {name!r} would leave the folder", folder, "use a plain name")
    return path
