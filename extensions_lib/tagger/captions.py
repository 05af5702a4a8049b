"""From a probability vector to caption text: pure functions, no model, no files.

The order of operations is fixed and documented because every option's effect depends on it:

1. thresholds (fixed or MCut, per category; a score equal to the threshold is kept) pick the
   general and character candidates; the rating is the most likely rating label;
2. `exclude` drops matching tags (the rating too), `include`, when given, keeps only matching
   general/character tags;
3. `max_tags` keeps the highest-scoring general/character tags;
4. each block is sorted (confidence, ties in label order; or alphabetical);
5. layout: [trigger tags] [rating if first] [characters if first] [general] [characters if last]
   [rating if last];
6. text: underscores to spaces (kaomoji excepted), optional escaping of `\\ ( )`;
7. tags equal after normalisation (case, `_` vs space, escaping) appear once, first occurrence wins.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from ..errors import AlchemyError
from ..options import from_dict, to_dict
from .labels import CHARACTER, GENERAL, RATING, Labels
from .options import CaptionOptions, WD14_THRESHOLDS

CHARACTER_MCUT_FLOOR = 0.15
_ESCAPE = re.compile(r"([\\()])")
_UNESCAPE = re.compile(r"\\([\\()])")
_SPACES = re.compile(r"\s+")


@dataclass(frozen=True)
class Scored:
    name: str      # raw label name, underscores and all
    score: float
    index: int     # position in the label list (ties sort by it)


@dataclass(frozen=True)
class Selection:
    """What the thresholds and filters kept, before layout and text formatting."""

    rating: Scored | None
    characters: list[Scored]
    general: list[Scored]


# ---- thresholds --------------------------------------------------------------------------------

def mcut_threshold(scores: np.ndarray) -> float:
    """MCut (Largeron et al. 2012): midpoint of the largest gap between neighbouring sorted scores."""
    ranked = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    if ranked.size < 2:
        return float("-inf")  # nothing to split: keep what there is
    gaps = ranked[:-1] - ranked[1:]
    t = int(np.argmax(gaps))
    return float((ranked[t] + ranked[t + 1]) / 2)


def thresholds(probs: np.ndarray, labels: Labels, opts: CaptionOptions,
               defaults: tuple[float, float] = WD14_THRESHOLDS) -> tuple[float, float]:
    """(general, character) thresholds for this image."""
    general = defaults[0] if opts.general_threshold is None else opts.general_threshold
    character = defaults[1] if opts.character_threshold is None else opts.character_threshold
    if opts.general_mcut:
        general = mcut_threshold(probs[labels.indices(GENERAL)])
    if opts.character_mcut:
        character = max(CHARACTER_MCUT_FLOOR, mcut_threshold(probs[labels.indices(CHARACTER)]))
    return general, character


# ---- matching ----------------------------------------------------------------------------------

def tag_key(tag: str) -> str:
    """The form two tags are compared in: lower case, unescaped, spaces for underscores."""
    text = _UNESCAPE.sub(r"\1", tag.strip()).lower().replace("_", " ")
    return _SPACES.sub(" ", text).strip()


class TagMatcher:
    """Matches tags against user entries: plain tags (case, `_`/space and escaping ignored) or /regex/."""

    def __init__(self, entries: Iterable[str]):
        self.plain: set[str] = set()
        self.patterns: list[re.Pattern] = []
        for entry in split_entries(entries):
            if len(entry) > 2 and entry.startswith("/") and entry.endswith("/"):
                try:
                    self.patterns.append(re.compile(entry[1:-1], re.IGNORECASE))
                except re.error as exc:
                    raise AlchemyError(f"bad regular expression {entry!r}: {exc}",
                                       fix="fix the /regex/ entry in the include/exclude list") from None
            else:
                self.plain.add(tag_key(entry))

    def __bool__(self) -> bool:
        return bool(self.plain or self.patterns)

    def matches(self, tag: str) -> bool:
        key = tag_key(tag)
        if key in self.plain:
            return True
        underscored = key.replace(" ", "_")
        return any(p.fullmatch(key) or p.fullmatch(underscored) for p in self.patterns)


def split_entries(entries: Iterable[str]) -> list[str]:
    """List-option values as tags: each entry may itself be comma-separated (a /regex/ is kept whole)."""
    out: list[str] = []
    for entry in entries:
        entry = str(entry).strip()
        if entry.startswith("/") and entry.endswith("/") and len(entry) > 2:
            out.append(entry)
            continue
        out.extend(part.strip() for part in entry.split(",") if part.strip())
    return out


def check_options(opts: CaptionOptions) -> CaptionOptions:
    """Check every choice, bound and /regex/ up front (options built in code too); returns `opts`.

    A bad entry found only while captioning would fail every image one by one instead of once.
    """
    from_dict(CaptionOptions, to_dict(opts), source="caption options")
    TagMatcher(opts.exclude), TagMatcher(opts.include)
    return opts


# ---- selection and layout ----------------------------------------------------------------------

def select(probs: np.ndarray, labels: Labels, opts: CaptionOptions,
           defaults: tuple[float, float] = WD14_THRESHOLDS) -> Selection:
    """Apply thresholds, filters and max_tags (steps 1-3 of the module docstring)."""
    probs = np.asarray(probs)
    if probs.shape != (len(labels),):
        raise ValueError(f"{probs.shape[0] if probs.ndim else 0} scores for {len(labels)} labels")
    general_thr, character_thr = thresholds(probs, labels, opts, defaults)
    exclude, include = TagMatcher(opts.exclude), TagMatcher(opts.include)

    def kept(category: int, threshold: float) -> list[Scored]:
        candidates = labels.indices(category)
        out = []
        for i in candidates[probs[candidates] >= threshold]:  # filters only see tags above threshold
            name = labels.names[i]
            if not exclude.matches(name) and (not include or include.matches(name)):
                out.append(Scored(name, float(probs[i]), int(i)))
        return out

    general, characters = kept(GENERAL, general_thr), kept(CHARACTER, character_thr)
    if opts.max_tags:
        best = sorted(general + characters, key=lambda s: (-s.score, s.index))[:opts.max_tags]
        keep = {s.index for s in best}
        general = [s for s in general if s.index in keep]
        characters = [s for s in characters if s.index in keep]

    rating = None
    ratings = labels.indices(RATING)
    if opts.rating != "off" and ratings.size:
        i = int(ratings[np.argmax(probs[ratings])])
        if not exclude.matches(labels.names[i]):
            rating = Scored(labels.names[i], float(probs[i]), i)
    return Selection(rating, characters, general)


def _ordered(block: list[Scored], sort: str) -> list[Scored]:
    if sort == "alphabetical":
        return sorted(block, key=lambda s: (s.name.lower(), s.index))
    return sorted(block, key=lambda s: (-s.score, s.index))


def layout(selection: Selection, opts: CaptionOptions) -> list[Scored]:
    """Steps 4-5: the model's tags in output order (trigger tags are added by :func:`caption_tags`)."""
    general = _ordered(selection.general, opts.sort)
    characters = _ordered(selection.characters, opts.sort)
    body = characters + general if opts.characters == "first" else general + characters
    if selection.rating is not None:
        body = [selection.rating] + body if opts.rating == "first" else body + [selection.rating]
    return body


# ---- text --------------------------------------------------------------------------------------

def format_tag(name: str, opts: CaptionOptions) -> str:
    """Step 6 for one tag."""
    text = name
    if opts.underscores_to_spaces and name not in split_entries(opts.underscore_exceptions):
        text = text.replace("_", " ")
    if opts.escape_brackets:
        text = _ESCAPE.sub(r"\\\1", text)
    return text


def dedupe(tags: Iterable[str]) -> list[str]:
    """Step 7: drop tags equal (by :func:`tag_key`) to an earlier one; empty tags go too."""
    seen: set[str] = set()
    out = []
    for tag in tags:
        key = tag_key(tag)
        if key and key not in seen:
            seen.add(key)
            out.append(tag)
    return out


def caption_tags(probs: np.ndarray, labels: Labels, opts: CaptionOptions,
                 defaults: tuple[float, float] = WD14_THRESHOLDS) -> list[str]:
    """The caption's tags for one image, trigger tags first."""
    model_tags = [format_tag(s.name, opts) for s in layout(select(probs, labels, opts, defaults), opts)]
    return dedupe(split_entries(opts.trigger_tags) + model_tags)


def split_caption(text: str, separator: str = ", ") -> list[str]:
    """A caption file's text as tags (split on the separator without its surrounding spaces)."""
    sep = separator.strip() or separator
    return [part.strip() for part in text.strip().split(sep) if part.strip()]


def join_caption(tags: Sequence[str], separator: str = ", ") -> str:
    return separator.join(tags)


def user_tags(existing_text: str, written_before: Iterable[str], separator: str = ", ") -> list[str]:
    """The existing caption's tags less those an earlier tagger run wrote (compared by :func:`tag_key`):
    what the user wrote or kept by hand."""
    ours = {tag_key(t) for t in written_before}
    return [t for t in split_caption(existing_text, separator) if tag_key(t) not in ours]


def merge_caption(new_tags: Sequence[str], existing_text: str | None, opts: CaptionOptions,
                  written_before: Iterable[str] = ()) -> tuple[list[str], list[str]]:
    """(the caption's tags, the tags this run adds to it) for a caption possibly already on disk.

    `existing_text` is the caption file's text, `written_before` the tags an earlier run wrote into it
    (remembered by the directory pipeline): on append/prepend those are replaced by `new_tags`, so
    re-rendering with other thresholds or filters never leaves an old run's tags behind, while the
    user's own tags stay. append = user tags then new ones; prepend = new then user tags;
    overwrite = new only; skip = the existing caption unchanged. Trigger tags stay first, duplicates go.
    The tags "added" are the new ones the user had not written: those alone are this run's to replace
    next time.
    """
    policy = opts.existing_caption
    if existing_text is None or policy == "overwrite":
        return list(new_tags), list(new_tags)
    own = user_tags(existing_text, written_before, opts.separator)
    if policy == "skip":
        return split_caption(existing_text, opts.separator), []
    merged = own + list(new_tags) if policy == "append" else list(new_tags) + own
    own_keys = {tag_key(t) for t in own}
    return dedupe(split_entries(opts.trigger_tags) + merged), [t for t in new_tags if tag_key(t) not in own_keys]


def render_caption(probs: np.ndarray, labels: Labels, opts: CaptionOptions,
                   defaults: tuple[float, float] = WD14_THRESHOLDS, existing_text: str | None = None) -> str:
    """The text to write for one image (the whole rule chain, existing caption included)."""
    tags, _added = merge_caption(caption_tags(probs, labels, opts, defaults), existing_text, opts)
    return join_caption(tags, opts.separator)
