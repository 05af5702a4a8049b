"""Batch edits as values: an :class:`Edit` turns one caption's text into its new text.

An edit that leaves a caption's tag list as it was returns the text untouched, so files an edit does
not concern are never rewritten (nor their spacing normalised).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

from ..errors import AlchemyError
from .captions import DEFAULT_SEPARATOR, dedupe, join_tags, split_tags

KINDS = ("add", "remove", "replace", "set")
POSITIONS = ("append", "prepend")
SCOPES = ("tags", "caption")


@dataclass(frozen=True)
class Edit:
    """kind add: put `tags` at `position` (ones already present stay where they are).
    remove: drop `tags`. replace: `find` -> `replacement` in each tag (scope "tags": a literal `find`
    must equal the whole tag, a regex is substituted inside each tag; a result holding commas becomes
    several tags, an empty one is dropped) or in the whole caption text (scope "caption"). set: the
    caption becomes `text` (a per-image edit)."""

    kind: str
    tags: tuple[str, ...] = ()
    position: str = "append"
    find: str = ""
    replacement: str = ""
    regex: bool = False
    scope: str = "tags"
    text: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise AlchemyError(f"unknown edit {self.kind!r}", fix=f"use one of: {', '.join(KINDS)}")
        if self.position not in POSITIONS or self.scope not in SCOPES:
            raise AlchemyError(f"position must be one of {POSITIONS} and scope one of {SCOPES}")
        object.__setattr__(self, "tags", tuple(t for tag in self.tags for t in split_tags(tag)))
        if self.kind in ("add", "remove") and not self.tags:
            raise AlchemyError(f"'{self.kind}' needs at least one tag", fix="give the tags, comma-separated")
        if self.kind == "replace":
            if not self.find:
                raise AlchemyError("'replace' needs something to find", fix="give --find TEXT (or a regex with --regex)")
            if self.regex:
                try:
                    re.compile(self.find)
                except re.error as exc:
                    raise AlchemyError(f"bad regular expression {self.find!r}: {exc}",
                                       fix="fix the pattern, or drop --regex to match the text literally") from None

    def describe(self) -> str:
        if self.kind == "add":
            return f"{self.position} {', '.join(self.tags)}"
        if self.kind == "remove":
            return f"remove {', '.join(self.tags)}"
        if self.kind == "replace":
            how = "regex " if self.regex else ""
            return f"replace {how}{self.find!r} -> {self.replacement!r} in {self.scope}"
        return "edit caption"


def _replace_tags(tags: Sequence[str], edit: Edit) -> list[str]:
    out: list[str] = []
    pattern = re.compile(edit.find) if edit.regex else None
    for tag in tags:
        if pattern is not None:
            new = pattern.sub(edit.replacement, tag)
        else:
            new = edit.replacement if tag == edit.find.strip() else tag
        out.extend(split_tags(new))
    return dedupe(out)


def apply_edit(edit: Edit, text: str, separator: str = DEFAULT_SEPARATOR) -> str:
    """The caption `text` after `edit`."""
    if edit.kind == "set":
        return edit.text.strip()
    if edit.kind == "replace" and edit.scope == "caption":
        if edit.regex:
            return re.sub(edit.find, edit.replacement, text)
        return text.replace(edit.find, edit.replacement)
    tags = split_tags(text)
    if edit.kind == "add":
        new = [t for t in dedupe(edit.tags) if t not in tags]
        result = tags + new if edit.position == "append" else new + tags
    elif edit.kind == "remove":
        drop = set(edit.tags)
        result = [t for t in tags if t not in drop]
    else:
        result = _replace_tags(tags, edit)
    return text if result == tags else join_tags(result, separator)
