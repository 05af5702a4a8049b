"""What every tagger offers the rest of the code, and how a model is identified in the score cache."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

import numpy as np
from PIL import Image

from .labels import Labels

# Bumped whenever a preprocessing function changes its output, so cached scores from the old code
# are not mistaken for the new code's.
PREPROCESS_VERSION = 1


@runtime_checkable
class Tagger(Protocol):
    """A loaded tagging model.

    `prepare` turns one decoded image into the model's input array (pure, safe to call from many
    threads); `predict` runs a stacked batch of them and returns one probability row per image.
    A tagger may also say how many `predict` calls the directory pipeline should keep running at
    once (`parallel_runs`, default 1; each call then uses its share of the cores).
    """

    name: str
    kind: str                    # "wd14" | "deepdanbooru"
    model_id: str                # stable identity of the weights + labels (score-cache key)
    labels: Labels
    input_size: int
    fixed_batch: int | None      # the model's own batch size when it cannot change, else None
    on_gpu: bool                 # runs on an accelerator (bigger batches pay off)
    default_thresholds: tuple[float, float]

    def prepare(self, image: Image.Image) -> np.ndarray: ...

    def predict(self, batch: np.ndarray) -> np.ndarray: ...

    def unload(self) -> None: ...


def file_digest(paths: Sequence[str | os.PathLike], *, chunk: int = 1 << 22) -> str:
    """sha256 over the bytes of several files, in order (model weights + tag list)."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()


def make_model_id(kind: str, paths: Sequence[str | os.PathLike]) -> str:
    """`<kind>-<folder name>-<16 hex digits of the content hash>`: readable and content-addressed."""
    folder = Path(paths[0]).parent.name or "model"
    digest = file_digest(paths)[:16]
    return f"{kind}-{folder}-p{PREPROCESS_VERSION}-{digest}"


def predict_images(tagger: Tagger, images: Sequence[Image.Image], batch_size: int | None = None) -> np.ndarray:
    """Probabilities for decoded images, batched as the model allows: (len(images), len(labels))."""
    if not images:
        return np.zeros((0, len(tagger.labels)), dtype=np.float32)
    step = tagger.fixed_batch or batch_size or len(images)
    rows = []
    for start in range(0, len(images), step):
        batch = np.stack([tagger.prepare(im) for im in images[start:start + step]])
        rows.append(tagger.predict(batch))
    return np.concatenate(rows)
