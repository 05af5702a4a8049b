"""The CLIP interrogator's label tables and their text-embedding cache files.

A table is a list of phrases ("by Claude Monet", "oil on canvas", ...) with one unit-length CLIP text
embedding per phrase. Embedding the 100k flavors takes hours on a CPU, so each table is cached in a
file laid out exactly like clip-interrogator's (and its precomputed `pharmapsychotic/ci-preprocess`
downloads): ``<clip name with / and @ as _>_<table>.safetensors`` holding ``embeds`` (fp16, N x D,
normalised) and ``hash`` (the sha256 hex digest of the comma-joined labels, one int8 per character).
Files users already have therefore load here unchanged, and ours load there. A file whose hash, shape
or dtype does not fit is recomputed and rewritten (atomically), never trusted.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ..atomic import atomic_path
from ..errors import AlchemyError

LIST_FILES = ("artists", "flavors", "mediums", "movements", "negative")
TABLES = ("artists", "flavors", "mediums", "movements", "trendings", "negative")
# clip-interrogator's trending sites, spelling ("dribble") included: the list's hash depends on it.
SITES = ("Artstation", "behance", "cg society", "cgsociety", "deviantart", "dribble", "flickr", "instagram",
         "pexels", "pinterest", "pixabay", "pixiv", "polycount", "reddit", "shutterstock", "tumblr", "unsplash",
         "zbrush central")


@dataclass
class LabelTable:
    name: str
    labels: list[str]
    embeds: np.ndarray          # (len(labels), dim) float32, rows of unit length


def shipped_lists_dir() -> Path:
    return Path(str(resources.files("extensions_lib.captioners").joinpath("data")))


def read_list(path: str | os.PathLike) -> list[str]:
    """One label per line, stripped (blank lines kept, as clip-interrogator keeps them: the hash counts them)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return [line.strip() for line in fh.readlines()]
    except OSError as exc:
        raise AlchemyError(f"label list unreadable ({exc.strerror or exc})", path,
                           "point --labels-dir at a folder with artists.txt, flavors.txt, mediums.txt, "
                           "movements.txt and negative.txt") from None


def table_labels(lists_dir: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Every table's phrases, in clip-interrogator's order (artists as "by X" then "inspired by X")."""
    root = Path(lists_dir) if lists_dir else shipped_lists_dir()
    raw = {name: read_list(root / f"{name}.txt") for name in LIST_FILES}
    trendings = list(SITES) + [f"trending on {s}" for s in SITES] + [f"featured on {s}" for s in SITES] + \
        [f"{s} contest winner" for s in SITES]
    return {"artists": [f"by {a}" for a in raw["artists"]] + [f"inspired by {a}" for a in raw["artists"]],
            "flavors": raw["flavors"], "mediums": raw["mediums"], "movements": raw["movements"],
            "trendings": trendings, "negative": raw["negative"]}


def labels_hash(labels: Sequence[str]) -> str:
    return hashlib.sha256(",".join(labels).encode()).hexdigest()


def hash_tensor(digest: str) -> np.ndarray:
    return np.array([ord(c) for c in digest], dtype=np.int8)


def cache_file(cache_dir: str | os.PathLike, clip_name: str, table: str) -> Path:
    """The file name clip-interrogator uses for `table` of CLIP model `clip_name` ("ViT-L-14/openai")."""
    if not table.isidentifier():
        raise ValueError(f"bad table name {table!r}")
    return Path(cache_dir) / f"{clip_name.replace('/', '_').replace('@', '_')}_{table}.safetensors"


def read_cached(path: Path, labels: Sequence[str], dim: int | None = None) -> np.ndarray | None:
    """The cached embeddings when `path` holds them for exactly these labels, else None (missing, damaged,
    stale or the wrong shape: all mean "recompute")."""
    from safetensors.numpy import load_file

    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
    except Exception:  # a damaged file is a cache miss, not an error
        return None
    embeds, digest = tensors.get("embeds"), tensors.get("hash")
    if embeds is None or digest is None or not np.array_equal(digest, hash_tensor(labels_hash(labels))):
        return None
    if embeds.ndim != 2 or embeds.shape[0] != len(labels) or (dim is not None and embeds.shape[1] != dim):
        return None
    if embeds.dtype not in (np.float16, np.float32):
        return None
    return embeds.astype(np.float32)


def write_cached(path: Path, labels: Sequence[str], embeds: np.ndarray) -> None:
    from safetensors.numpy import save_file

    tensors = {"embeds": np.ascontiguousarray(embeds, dtype=np.float16),
               "hash": hash_tensor(labels_hash(labels))}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def build_table(name: str, labels: Sequence[str], encode: Callable[[list[str]], np.ndarray], *,
                cache_dir: str | os.PathLike | None, clip_name: str, dim: int | None = None,
                chunk_size: int = 2048, progress: Callable[[int, int], None] | None = None) -> LabelTable:
    """The table from its cache file, or encoded in chunks (`encode(texts) -> (n, dim)` unit rows) and cached.

    Rows are stored fp16 like clip-interrogator's files, and a freshly encoded table is rounded through
    fp16 too, so a cold run and a warm run rank identically.
    """
    labels = list(labels)
    path = cache_file(cache_dir, clip_name, name) if cache_dir is not None else None
    if path is not None:
        cached = read_cached(path, labels, dim)
        if cached is not None:
            return LabelTable(name, labels, cached)
    rows = []
    for start in range(0, len(labels), chunk_size):
        rows.append(np.asarray(encode(labels[start:start + chunk_size]), dtype=np.float32))
        if progress:
            progress(min(start + chunk_size, len(labels)), len(labels))
    embeds = np.concatenate(rows) if rows else np.zeros((0, dim or 0), np.float32)
    embeds = embeds.astype(np.float16)
    if path is not None and labels:
        write_cached(path, labels, embeds)
    return LabelTable(name, labels, embeds.astype(np.float32))
