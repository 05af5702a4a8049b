"""The tag editor's options, declared once (the `alchemy tags` flags, the tab's controls, API bodies)."""
from __future__ import annotations

from dataclasses import dataclass

from ..options import option
from .captions import DEFAULT_SEPARATOR, split_tags
from .edits import POSITIONS, SCOPES
from .filters import TagFilter
from .stats import SORTS


@dataclass
class TagDatasetOptions:
    """Which files make the dataset."""

    recursive: bool = option(False, help="also edit images in sub-folders")
    caption_extension: str = option(".txt", help="caption file extension (img.txt, else img.png.txt)")


@dataclass
class TagSelectOptions:
    """Which images an edit touches (and the tag table counts)."""

    include: list = option([], help="only images with these tags; comma-separated", multiple=True,
                           widget="textbox", group="Filter")
    include_mode: str = option("and", help="and: every include tag; or: any of them", choices=["and", "or"],
                               widget="radio", group="Filter")
    exclude: list = option([], help="skip images with these tags; comma-separated", multiple=True,
                           widget="textbox", group="Filter")
    exclude_mode: str = option("or", help="or: skip if any exclude tag is present; and: only if all are",
                               choices=["and", "or"], widget="radio", group="Filter")

    def tag_filter(self) -> TagFilter:
        def tags(values):  # "a, b" in one flag or box is two tags
            return tuple(t for value in values for t in split_tags(value))

        return TagFilter(tags(self.include), self.include_mode, tags(self.exclude), self.exclude_mode)


@dataclass
class TagListOptions:
    sort: str = option("frequency", help="order of the tag table: frequency (most first), name (A-Z) or token "
                                         "length (CLIP tokens, longest first)", choices=list(SORTS), widget="radio")
    reverse: bool = option(False, help="reverse that order")
    search: str = option("", help="list only tags containing this text (case ignored)")
    top: int = option(0, help="list only this many tags; 0 = all", minimum=0)

    def rows(self, counts, token_count=None) -> list[tuple[str, int]]:
        """The table's (tag, count) rows for these settings."""
        from .stats import clip_token_counter, sort_tags

        if self.sort == "tokens" and token_count is None:
            token_count = clip_token_counter()
        wanted = self.search.strip().lower()
        counts = {t: n for t, n in counts.items() if wanted in t.lower()} if wanted else counts
        rows = sort_tags(counts, self.sort, token_count=token_count,
                         descending=None if not self.reverse else self.sort == "name")
        return rows[:self.top or None]


@dataclass
class TagEditOptions:
    position: str = option("append", help="where added tags go", choices=list(POSITIONS), widget="radio")
    regex: bool = option(False, help="find is a Python regular expression, substituted inside each tag "
                                     "(\\1 refers to groups); otherwise it must equal a whole tag")
    scope: str = option("tags", help="replace within each tag, or in the whole caption text",
                        choices=list(SCOPES), widget="radio")
    separator: str = option(DEFAULT_SEPARATOR, help="text between tags in captions we rewrite")
    allow_empty: bool = option(False, help="let an edit leave a caption empty (refused otherwise)")
