"""Raw tagger scores on disk, keyed by (image content hash, model id).

With scores cached, changing a threshold, a filter or the layout re-captions a whole folder without
running the model again. Keys are content hashes, not file names, so a replaced image is never
served stale scores and a renamed one keeps its entry. One small `.npy` file per image and model,
written atomically (a crash leaves either the old entry or none), lives outside the image folder by
default. A damaged entry reads as a miss and is rewritten.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_open


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or (Path.home() / ".cache")
    return Path(base) / "alchemy" / "tagger"


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ScoreCache:
    """Float32 score vectors of one model, stored under `root/<model id>/<ab>/<hash>.npy`."""

    def __init__(self, root: str | os.PathLike, model_id: str, n_labels: int):
        self.dir = Path(root) / model_id
        self.n_labels = n_labels

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npy"

    def get(self, key: str) -> np.ndarray | None:
        path = self._path(key)
        try:
            scores = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        if scores.shape != (self.n_labels,) or scores.dtype != np.float32:
            return None
        return scores

    def put(self, key: str, scores: np.ndarray) -> None:
        scores = np.asarray(scores, dtype=np.float32)
        if scores.shape != (self.n_labels,):
            raise ValueError(f"expected {self.n_labels} scores, got shape {scores.shape}")
        with atomic_open(self._path(key), "wb") as fh:
            np.save(fh, scores, allow_pickle=False)
