"""A dataset folder as (image, caption file, caption text) entries.

A caption is looked for beside its image as ``<stem><ext>`` (the WebUI's and kohya's ``img.txt``), then
``<name><ext>`` (``img.png.txt``, which gallery-dl and sd-tagging-helper write); an image with neither
gets ``<stem><ext>`` when a tag is first added. Tags are the comma-separated parts of the caption.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from ..errors import AlchemyError
from ..tagger.image_io import list_images

DEFAULT_SEPARATOR = ", "
MAX_CAPTION_BYTES = 1 << 20  # a "caption" larger than this is not a caption: skipped, never rewritten


def split_tags(text: str) -> list[str]:
    """Tags of a caption: comma-separated, whitespace trimmed, empty parts dropped, order kept."""
    return [part.strip() for part in text.replace("\n", ",").split(",") if part.strip()]


def join_tags(tags: Iterable[str], separator: str = DEFAULT_SEPARATOR) -> str:
    return separator.join(tags)


def dedupe(tags: Iterable[str]) -> list[str]:
    """Tags in order with later repeats dropped."""
    seen: set[str] = set()
    out = []
    for tag in tags:
        if tag not in seen:
            seen.add(tag)
            out.append(tag)
    return out


@dataclass
class Entry:
    key: str             # image path relative to the dataset folder, '/'-separated: the entry's only name
    image: Path
    caption_path: Path
    text: str            # caption as on disk ("" when there is no caption file)
    exists: bool         # whether caption_path exists

    @property
    def tags(self) -> list[str]:
        return split_tags(self.text)


def caption_path_for(image: Path, extension: str = ".txt") -> tuple[Path, bool]:
    """(caption file of `image`, whether it exists), by the lookup order above."""
    for candidate in (image.with_suffix(extension), image.with_name(image.name + extension)):
        if candidate.is_file():
            return candidate, True
    return image.with_suffix(extension), False


def read_caption(path: Path) -> str:
    """Caption text; raises ValueError with a reason for files that are not readable text."""
    size = path.stat().st_size
    if size > MAX_CAPTION_BYTES:
        raise ValueError(f"{size} bytes is too large for a caption")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    return text.rstrip("\r\n")


def load_entries(folder: str | os.PathLike, *, recursive: bool = False, extension: str = ".txt"
                 ) -> tuple[list[Entry], list[tuple[str, str]]]:
    """(entries in a stable order, [(file, why skipped)]). A caption file we cannot read is skipped, so an
    edit can never overwrite it."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise AlchemyError("dataset folder not found", root, "give a folder holding images and their captions")
    if not extension.startswith(".") or len(extension) < 2 or any(c in extension for c in "/\\"):
        raise AlchemyError(f"caption extension {extension!r} must look like '.txt'")
    entries, skipped = [], []
    for image in list_images(root, recursive=recursive):
        caption, exists = caption_path_for(image, extension)
        text = ""
        if exists:
            try:
                text = read_caption(caption)
            except (OSError, ValueError) as exc:
                skipped.append((str(caption), str(exc)))
                continue
        key = image.relative_to(root).as_posix()
        entries.append(Entry(key, image, caption, text, exists))
    return entries, skipped
