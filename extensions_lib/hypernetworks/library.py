"""A hypernetworks folder: every ``**/*.pt`` below it, by file stem, as the WebUI lists them.

Unlike the host, each file is checked when it first appears (or changes): a file that is not a usable
hypernetwork (an embedding, a LoRA, random bytes, a broken structure) is listed under ``skipped`` with
the reason instead of failing later in the middle of a generation. :meth:`HypernetworkLibrary.refresh`
re-reads only files whose modification time or size changed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import AlchemyError
from ..folders import check_folder
from .file import read_hypernetwork
from .module import Hypernetwork


@dataclass(frozen=True)
class Entry:
    """One ``.pt`` file. `error` is None for a usable hypernetwork, else why it is skipped."""

    name: str
    path: Path
    mtime_ns: int
    size: int
    widths: tuple[int, ...] = ()
    error: str | None = None

    @property
    def stamp(self) -> tuple[int, int]:
        return self.mtime_ns, self.size


def _check(name: str, path: Path, stamp: tuple[int, int]) -> Entry:
    try:
        hn = read_hypernetwork(path)
    except AlchemyError as exc:
        reason = exc.what + (f" ({exc.fix})" if exc.fix else "")
        return Entry(name, path, *stamp, error=reason)
    except Exception as exc:  # noqa: BLE001 — one odd file (unreadable, vanished) must not break the listing
        return Entry(name, path, *stamp, error=f"could not be read ({type(exc).__name__}: {exc})")
    return Entry(name, path, *stamp, widths=tuple(hn.sizes))


def scan(directory: Path) -> list[tuple[str, Path, tuple[int, int]]]:
    """(name, path, (mtime_ns, size)) of every ``.pt`` below `directory`, in the host's order (paths
    sorted case-insensitively; for a repeated name the host keeps the last). Like the host's ``glob``,
    hidden files and folders (names starting with ".") are left out."""
    found = []
    for path in sorted(directory.glob("**/*.pt"), key=lambda p: str(p).lower()):
        if any(part.startswith(".") for part in path.relative_to(directory).parts):
            continue
        try:
            st = path.stat()
        except OSError:
            continue
        if path.is_file():
            found.append((path.stem, path, (st.st_mtime_ns, st.st_size)))
    return found


def find(directory: str | os.PathLike, name: str) -> Path:
    """The file the host would load for `name` from `directory`, found without reading any file: for
    one-off lookups (the command line), where a :class:`HypernetworkLibrary` would read the whole folder.
    A file that is not a usable hypernetwork is reported when it is read."""
    directory = check_folder(directory, "the hypernetworks folder")
    found = {stem: path for stem, path, _ in scan(directory)} if directory.is_dir() else {}
    found.pop("None", None)  # the host's "no hypernetwork" choice
    if name not in found:
        known = ", ".join(found) or "none"
        raise AlchemyError(f"no hypernetwork named {name!r}", directory,
                           f"put {name}.pt in this folder or below it (found: {known})")
    return found[name]


class HypernetworkLibrary:
    """The hypernetworks of one folder. Call :meth:`refresh` to pick up added, changed or removed files."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)  # a file here lists nothing; asking it for a name says why
        self._entries: dict[Path, Entry] = {}
        self._by_name: dict[str, Entry] = {}
        self._skipped: list[Entry] = []
        self._loaded: dict[Path, tuple[tuple[int, int], Hypernetwork]] = {}
        self.refresh()

    def refresh(self) -> bool:
        """Rescan the folder; returns True when the listing changed. Unchanged files are not re-read."""
        found = scan(self.directory) if self.directory.is_dir() else []
        entries: dict[Path, Entry] = {}
        for name, path, stamp in found:
            old = self._entries.get(path)
            entries[path] = old if old is not None and old.stamp == stamp else _check(name, path, stamp)
        changed = entries != self._entries
        self._entries = entries
        self._loaded = {p: v for p, v in self._loaded.items() if p in entries and entries[p].stamp == v[0]}

        by_name: dict[str, Entry] = {}
        skipped = [e for e in entries.values() if e.error is not None]
        for entry in entries.values():
            if entry.error is not None:
                continue
            if entry.name == "None":  # the host's "no hypernetwork" choice; it never lists such a file
                skipped.append(_skip(entry, "the name 'None' is reserved by the WebUI; rename the file"))
                continue
            if entry.name in by_name:
                skipped.append(_skip(by_name[entry.name], f"another file has the same name: {entry.path}"))
            by_name[entry.name] = entry
        self._by_name = by_name
        self._skipped = skipped
        return changed

    def names(self) -> list[str]:
        """Names of the usable hypernetworks, in the host's order."""
        return list(self._by_name)

    def entries(self) -> list[Entry]:
        return list(self._by_name.values())

    @property
    def skipped(self) -> list[Entry]:
        """Files that are not listed, each with ``error`` saying why."""
        return list(self._skipped)

    def path(self, name: str) -> Path:
        entry = self._by_name.get(name)
        if entry is None:
            check_folder(self.directory, "the hypernetworks folder")
            raise AlchemyError(f"no hypernetwork named {name!r}", self.directory, self._unknown_fix(name))
        return entry.path

    def load(self, name: str) -> Hypernetwork:
        """The named hypernetwork (the same object again while its file is unchanged, as the host reuses
        loaded ones)."""
        path = self.path(name)
        stamp = self._entries[path].stamp
        cached = self._loaded.get(path)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        hn = read_hypernetwork(path)
        self._loaded[path] = (stamp, hn)
        return hn

    def _unknown_fix(self, name: str) -> str:
        skipped = [e for e in self._skipped if e.name == name]
        if skipped:
            return f"{skipped[0].path} is skipped: {skipped[0].error}"
        known = ", ".join(self.names()) or "none"
        return f"put {name}.pt in this folder and refresh (known: {known})"


def _skip(entry: Entry, reason: str) -> Entry:
    return Entry(entry.name, entry.path, entry.mtime_ns, entry.size, entry.widths, error=reason)
