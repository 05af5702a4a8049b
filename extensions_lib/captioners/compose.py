"""The caption composer: trigger words, tags, the BLIP sentence and CLIP terms under a CLIP-token budget.

Pure functions. Parts are laid out in `ComposeOptions.order`, duplicates dropped (compared like the
tagger compares tags: case, `_`/space and escaping ignored). The first `keep_first` items (0: every
trigger word and the sentence) are protected: never dropped. The others are added in order while the
joined caption (with room kept for protected items further on) fits `token_budget` CLIP tokens; the
first that does not fit ends them. The result also
says how many leading items are protected (`keep_tokens`, what kohya's --keep_tokens should be so
shuffling never moves them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..tagger.captions import split_entries, tag_key
from .clip_interrogator import token_count
from .options import ComposeOptions


@dataclass
class Parts:
    tags: list[str] = field(default_factory=list)
    sentence: str = ""
    clip: list[str] = field(default_factory=list)


@dataclass
class Composed:
    items: list[str]
    text: str
    keep_tokens: int
    dropped: list[str]
    tokens: int


def clip_terms(prompt: str, sentence: str = "", separator: str = ", ") -> list[str]:
    """An interrogator prompt's terms, without the sentence it starts with."""
    prompt = prompt.strip()
    if sentence and prompt.startswith(sentence):
        prompt = prompt[len(sentence):].lstrip(" ,")
    return [t.strip() for t in prompt.split(separator.strip() or separator) if t.strip()]


def compose(parts: Parts, opts: ComposeOptions) -> Composed:
    sources = {"trigger": split_entries(opts.trigger_words), "tags": list(parts.tags),
               "sentence": [parts.sentence.strip()] if parts.sentence.strip() else [], "clip": list(parts.clip)}
    ordered: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in split_entries(opts.order):
        if name not in sources:
            raise ValueError(f"unknown caption part {name!r}")
        for item in sources[name]:
            key = tag_key(item)
            if key and key not in seen:
                seen.add(key)
                ordered.append((name, item))
    if opts.keep_first:
        protected = set(range(min(opts.keep_first, len(ordered))))
    else:
        protected = {i for i, (name, _) in enumerate(ordered) if name in ("trigger", "sentence")}
    sep = opts.separator
    kept: list[str] = []
    kept_protected: list[bool] = []
    dropped: list[str] = []
    full = False
    for i, (_, item) in enumerate(ordered):
        if i in protected:
            kept.append(item)
            kept_protected.append(True)
            continue
        later = [ordered[j][1] for j in sorted(protected) if j > i]  # room they will need is reserved
        if not full and (not opts.token_budget or token_count(sep.join(kept + [item] + later)) <= opts.token_budget):
            kept.append(item)
            kept_protected.append(False)
        else:
            full = True
            dropped.append(item)
    keep_tokens = 0
    while keep_tokens < len(kept_protected) and kept_protected[keep_tokens]:
        keep_tokens += 1
    text = sep.join(kept)
    return Composed(kept, text, keep_tokens, dropped, token_count(text))
