"""Raw tagger scores on disk, keyed by (image content hash, model id).

With scores cached, changing a threshold, a filter or the layout re-captions a whole folder without
running the model again. Keys are content hashes, not file names, so a replaced image is never
served stale scores and a renamed one keeps its entry. One small `.npy` file per image and model,
written atomically (a crash leaves either the old entry or none), lives outside the image folder by
default. A damaged entry reads as a miss and is rewritten.

Beside the scores, :class:`WrittenTags` remembers which tags a run wrote into each caption file, so
an append/prepend re-run (a re-render from cached scores with other thresholds, say) replaces
exactly those and keeps the tags the user wrote by hand.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from ..atomic import atomic_open
from ..cache_dir import default_cache_dir as alchemy_cache_dir


def default_cache_dir() -> Path:
    return alchemy_cache_dir() / "tagger"


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


class WrittenTags:
    """The tags a tagger run added to each caption file, under `root/written/<ab>/<hash of the path>.json`.

    Keyed by the caption's absolute path: a moved folder loses the record, and then its tags simply
    count as the user's (the behaviour without a record). A missing or damaged record reads as none.
    """

    def __init__(self, root: str | os.PathLike):
        self.dir = Path(root) / "written"

    def _path(self, caption: Path) -> tuple[Path, str]:
        name = str(Path(caption).resolve())
        key = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()
        return self.dir / key[:2] / f"{key}.json", name

    def get(self, caption: str | os.PathLike) -> list[str]:
        path, name = self._path(Path(caption))
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        if not isinstance(record, dict) or record.get("caption") != name or not isinstance(record.get("tags"), list):
            return []
        return [t for t in record["tags"] if isinstance(t, str)]

    def put(self, caption: str | os.PathLike, tags: list[str]) -> None:
        path, name = self._path(Path(caption))
        with atomic_open(path, "w") as fh:
            json.dump({"caption": name, "tags": list(tags)}, fh)  # ASCII: any path survives, odd bytes too
