"""Tag counts and the three orders of the tag table."""
from __future__ import annotations

from collections import Counter
from typing import Callable, Iterable

SORTS = ("frequency", "name", "tokens")


def tag_counts(tag_lists: Iterable[Iterable[str]]) -> Counter:
    """How many captions hold each tag (a tag repeated inside one caption counts once)."""
    counts: Counter = Counter()
    for tags in tag_lists:
        counts.update(set(tags))
    return counts


def clip_token_counter() -> Callable[[str], int]:
    """Tokens a tag costs in the prompt (CLIP BPE from open_clip's bundled vocabulary, no download)."""
    from ..backend.tokenizer import make_tokenizer

    tokenizer = make_tokenizer("open_clip")
    cache: dict[str, int] = {}

    def count(tag: str) -> int:
        if tag not in cache:
            cache[tag] = len(tokenizer.tokenize([tag])[0])
        return cache[tag]

    return count


def sort_tags(counts: Counter, by: str = "frequency", *, descending: bool | None = None,
              token_count: Callable[[str], int] | None = None) -> list[tuple[str, int]]:
    """[(tag, count)] ordered by frequency (most first), name (A-Z) or token length (longest first);
    ties broken by name. `descending` flips the default direction of `by` when given."""
    if by not in SORTS:
        raise ValueError(f"sort must be one of {SORTS}, got {by!r}")
    items = sorted(counts.items(), key=lambda kv: kv[0])  # name order first: a stable tie-break below
    if by == "name":
        return items[::-1] if descending else items
    if by == "frequency":
        key = lambda kv: kv[1]  # noqa: E731
    else:
        counter = token_count or clip_token_counter()
        key = lambda kv: counter(kv[0])  # noqa: E731
    # sorted() is stable in both directions, so ties stay in name order.
    return sorted(items, key=key, reverse=True if descending is None else descending)
