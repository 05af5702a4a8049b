"""What every captioner offers, next to the taggers' interface (`extensions_lib.tagger.base.Tagger`).

A captioner is loaded from a folder or file (by a loader that :class:`extensions_lib.tagger.ModelSlot`
accepts, so the tagger, BLIP and CLIP share one slot: one model resident at a time), turns a batch
of decoded images into results, and is unloaded. Like a tagger it has a `model_id` naming its weights,
which keys the caches: a re-run only works on images whose content (hash) it has not seen.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable

from PIL import Image

QUICK_DIGEST_SPAN = 8 << 20


@runtime_checkable
class Captioner(Protocol):
    name: str
    kind: str          # "blip" | "clip"
    model_id: str      # stable identity of the weights (cache key)
    on_gpu: bool

    def caption(self, images: Sequence[Image.Image], options) -> list[str]: ...

    def unload(self) -> None: ...


def quick_digest(paths: Sequence[str | os.PathLike]) -> str:
    """sha256 over each file's size, first and last 8 MiB: identifies multi-GB weights in milliseconds
    (hashing 4 GB on every load would cost more than captioning a small folder)."""
    h = hashlib.sha256()
    for path in paths:
        size = os.path.getsize(path)
        h.update(f"{Path(path).name}:{size}:".encode())
        with open(path, "rb") as fh:
            h.update(fh.read(QUICK_DIGEST_SPAN))
            if size > 2 * QUICK_DIGEST_SPAN:
                fh.seek(size - QUICK_DIGEST_SPAN)
                h.update(fh.read(QUICK_DIGEST_SPAN))
            elif size > QUICK_DIGEST_SPAN:
                h.update(fh.read())
    return h.hexdigest()[:16]


def pick_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device
