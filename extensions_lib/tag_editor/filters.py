"""Which images an edit touches: include/exclude tag lists, each combined with AND or OR."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

MODES = ("and", "or")


@dataclass(frozen=True)
class TagFilter:
    """include (AND: every tag present; OR: any) and exclude (OR: none present; AND: not all present).
    An empty list does not filter."""

    include: tuple[str, ...] = ()
    include_mode: str = "and"
    exclude: tuple[str, ...] = ()
    exclude_mode: str = "or"

    def __post_init__(self):
        for name in ("include_mode", "exclude_mode"):
            if getattr(self, name) not in MODES:
                raise ValueError(f"{name} must be 'and' or 'or', got {getattr(self, name)!r}")
        object.__setattr__(self, "include", tuple(t.strip() for t in self.include if t.strip()))
        object.__setattr__(self, "exclude", tuple(t.strip() for t in self.exclude if t.strip()))

    def matches(self, tags: Iterable[str]) -> bool:
        present = set(tags)
        if self.include:
            hits = [t in present for t in self.include]
            if not (all(hits) if self.include_mode == "and" else any(hits)):
                return False
        if self.exclude:
            hits = [t in present for t in self.exclude]
            if all(hits) if self.exclude_mode == "and" else any(hits):
                return False
        return True
