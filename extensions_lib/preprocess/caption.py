"""Captions for preprocessed images: the source's existing caption, a tagger's, and how they combine."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from ..tagger.captions import dedupe
from .options import CaptionAction

# Turns output images into caption texts, one per image, in order (batched: one call per source).
Captioner = Callable[[Sequence[Image.Image]], list[str]]


def existing_caption_path(source: Path) -> Path:
    """`<stem>.txt` beside the source, the pairing the WebUI's dataset loader uses."""
    return source.with_suffix(".txt")


def read_existing_caption(source: Path) -> tuple[str | None, str | None]:
    """(caption text or None, problem or None). A caption we cannot read is reported, never fatal."""
    path = existing_caption_path(source)
    if not path.is_file():
        return None, None
    try:
        return path.read_text(encoding="utf-8-sig").strip(), None
    except UnicodeDecodeError:
        return None, f"{path}: not UTF-8 text, existing caption ignored (re-save it as UTF-8)"
    except OSError as exc:
        return None, f"{path}: unreadable ({exc.strerror or exc}), existing caption ignored"


def _join(first: str, second: str) -> str:
    # The WebUI joined with a space, which glued the last tag of one part to the first tag of the
    # other ("trigger 1girl") once trainers split captions on commas to shuffle or drop tags. Join as
    # comma-separated tags instead (the trainers' unit), keeping the first of any repeated tag.
    tags = [t.strip() for part in (first, second) for t in part.split(",")]
    return ", ".join(dedupe(t for t in tags if t))


def merge_caption(new: str, existing: str | None, action: CaptionAction) -> str:
    """The caption to write: `new` (from the tagger, may be empty) combined with the source's caption."""
    new = new.strip()
    if not existing or action is CaptionAction.IGNORE:
        return new
    if action is CaptionAction.COPY:
        return existing.strip()
    if action is CaptionAction.PREPEND:
        return _join(existing, new)
    return _join(new, existing)
