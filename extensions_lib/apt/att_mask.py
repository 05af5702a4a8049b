"""Per-pixel loss weights from attention masks (DreamArtist's "Attention Map").

A mask is a greyscale image beside the training image, named ``<stem>_att.<ext>``. It is resized
(bicubic) to the latent size and each grey level g becomes a weight: g ≤ 127 → g/127 (0…1), g > 127 →
1 + 4·(g − 127)/128 (1…5); so black ignores a region, mid grey is neutral and white counts five times.
Masks (and the ``_att_proc`` files DreamArtist's mask processing writes) are never training images.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import AlchemyError
from ..train.dataset import IMAGE_SUFFIXES, open_image

MASK_SUFFIXES = ("_att", "_att_proc")
LATENT_DOWNSCALE = 8


def is_mask_file(path: Path) -> bool:
    """True for ``*_att.*`` and ``*_att_proc.*``: kept out of the training images."""
    return path.stem.endswith(MASK_SUFFIXES)


def mask_path(image: Path) -> Path | None:
    """The ``<stem>_att`` mask beside `image`, if there is one (first image suffix in sorted order)."""
    for suffix in sorted(IMAGE_SUFFIXES):
        for candidate in (image.with_name(f"{image.stem}_att{suffix}"), image.with_name(f"{image.stem}_att{suffix.upper()}")):
            if candidate.is_file():
                return candidate
    return None


def grey_to_weight(grey: np.ndarray) -> np.ndarray:
    """DreamArtist's mapping of grey levels 0..255 to weights 0..5 (see the module docstring)."""
    g = grey.astype(np.float32)
    return np.where(g <= 127, g / 127, 1 + 4 * (g - 127) / 128).astype(np.float32)


def load_mask_weight(path: Path, image_size: tuple[int, int]) -> torch.Tensor:
    """(1, h, w) float32 weights at the latent size of an image trained at `image_size` (w, h)."""
    w, h = (s // LATENT_DOWNSCALE for s in image_size)
    try:
        mask = open_image(path.read_bytes())
    except Exception as exc:  # PIL raises many kinds for broken files
        raise AlchemyError(f"attention mask cannot be read as an image ({exc or type(exc).__name__})", path,
                           fix="replace it with a greyscale image, or delete it to train that image unweighted") \
            from None
    small = mask.convert("L").resize((w, h), Image.BICUBIC)
    return torch.from_numpy(grey_to_weight(np.asarray(small)))[None].clone()
