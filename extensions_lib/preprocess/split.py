"""Split oversized images into overlapping target-sized tiles (the WebUI's "Split oversized images").

The image is scaled so its short side matches the target, then cut along its long side into
`ceil((L - t*overlap) / (t*(1 - overlap)))` evenly spaced tiles (L = scaled long side, t = tile
length along it). That count guarantees neighbouring tiles overlap by at least `overlap * t` and that
the first tile starts at 0 and the last ends at L, so the tiles cover the whole image.
"""
from __future__ import annotations

import math

from PIL import Image


def split_ratio(width: int, height: int, target_w: int, target_h: int) -> float:
    """How much less elongated the image is than the target along its long side (< 1: more elongated)."""
    if height > width:
        return (width * target_h) / (height * target_w)
    return (height * target_w) / (width * target_h)


def should_split(width: int, height: int, target_w: int, target_h: int, threshold: float) -> bool:
    ratio = split_ratio(width, height, target_w, target_h)
    return ratio < 1.0 and ratio <= threshold


def tile_offsets(length: int, tile: int, overlap: float) -> list[int]:
    """Start offsets of evenly spaced tiles of `tile` pixels covering `length` pixels."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile * overlap) / (tile * (1.0 - overlap)))
    if count <= 1:
        return [0]
    # Integer arithmetic so the last tile ends exactly at `length` (a float step can fall 1 px short).
    return [(length - tile) * i // (count - 1) for i in range(count)]


def split_image(img: Image.Image, target_w: int, target_h: int, overlap: float) -> list[Image.Image]:
    """Tiles of exactly target_w x target_h, in reading order (top to bottom or left to right)."""
    if img.height > img.width:
        scaled_h = img.height * target_w // img.width
        scaled = img.resize((target_w, scaled_h), resample=Image.BICUBIC)
        return [scaled.crop((0, y, target_w, y + target_h)) for y in tile_offsets(scaled_h, target_h, overlap)]
    scaled_w = img.width * target_h // img.height
    scaled = img.resize((scaled_w, target_h), resample=Image.BICUBIC)
    return [scaled.crop((x, 0, x + target_w, target_h)) for x in tile_offsets(scaled_w, target_w, overlap)]
