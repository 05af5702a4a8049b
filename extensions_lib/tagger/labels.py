"""A tagger's label list: one name and one category per model output.

WD14 models ship `selected_tags.csv` (`tag_id,name,category,count`; category 9 = rating, 0 = general,
4 = character). Names are raw Danbooru names with underscores and may hold quotes and commas, so the
file is read with a real CSV parser and rows are selected by category, never by position.
DeepDanbooru keeps its tag names inside the checkpoint; its `rating:*` entries are the ratings.
"""
from __future__ import annotations

import csv
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from ..errors import AlchemyError

GENERAL = 0
CHARACTER = 4
RATING = 9
CATEGORY_NAMES = {GENERAL: "general", CHARACTER: "character", RATING: "rating"}

_CSV_HEADER = ["tag_id", "name", "category"]


@dataclass(frozen=True)
class Labels:
    """Output names and categories, aligned index for index with the model's probability vector."""

    names: tuple[str, ...]
    categories: np.ndarray  # int16, one per name

    def __post_init__(self):
        if len(self.names) != len(self.categories):
            raise ValueError("names and categories differ in length")

    def __len__(self) -> int:
        return len(self.names)

    def indices(self, category: int) -> np.ndarray:
        """Positions of every label of `category`, in file order."""
        return np.flatnonzero(self.categories == category)


def read_selected_tags(path: str | os.PathLike) -> Labels:
    """Parse a WD14 `selected_tags.csv`; a malformed file raises an error naming the row."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise AlchemyError(f"cannot read the tag list ({exc.strerror or exc})", path,
                           "put the model's selected_tags.csv in this folder") from None
    except UnicodeDecodeError:
        raise AlchemyError("tag list is not UTF-8 text", path,
                           "download selected_tags.csv again from the model's page") from None
    rows = csv.reader(io.StringIO(text, newline=""))
    header = [h.strip() for h in next(rows, [])]
    if header[:3] != _CSV_HEADER:
        raise AlchemyError(f"tag list header is {header[:4]}, expected tag_id,name,category,count", path,
                           "use the selected_tags.csv that came with the model")
    names: list[str] = []
    categories: list[int] = []
    for line, row in enumerate(rows, start=2):
        if not row:
            continue
        try:
            name, category = row[1], int(row[2])
        except (IndexError, ValueError):
            raise AlchemyError(f"row {line} is malformed: {row!r}", path,
                               "use the selected_tags.csv that came with the model") from None
        if not name:
            raise AlchemyError(f"row {line} has an empty tag name", path,
                               "use the selected_tags.csv that came with the model")
        names.append(name)
        categories.append(category)
    if not names:
        raise AlchemyError("tag list has no rows", path, "use the selected_tags.csv that came with the model")
    return Labels(tuple(names), np.asarray(categories, dtype=np.int16))


def deepdanbooru_labels(tags: Sequence[str]) -> Labels:
    """DeepDanbooru's tag list: `rating:*` entries are ratings, everything else is general.

    The torch checkpoint carries no category table, so characters cannot be told apart from general
    tags here; they share the general threshold, as in the WebUI.
    """
    names = tuple(str(t) for t in tags)
    cats = [RATING if n.startswith("rating:") else GENERAL for n in names]
    return Labels(names, np.asarray(cats, dtype=np.int16))
