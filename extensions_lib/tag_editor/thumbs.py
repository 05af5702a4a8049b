"""Gallery thumbnails from a cache, so a folder of large images opens fast the second time.

A thumbnail is keyed by the image's resolved path, size, modification time and the thumbnail size: a
replaced image gets a new one. Files are written atomically; an undecodable image gives None (the
gallery shows the others).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from PIL import Image, features

from ..atomic import atomic_path
from ..tagger.image_io import ImageSkipped, decode_image


def default_thumb_dir() -> Path:
    from ..cache_dir import default_cache_dir

    return default_cache_dir() / "thumbnails"


def thumbnail(image: str | os.PathLike, cache_dir: str | os.PathLike, size: int = 256) -> Path | None:
    """Path of a cached thumbnail (long side `size`) of `image`, made on first use; None if undecodable."""
    image = Path(image)
    try:
        st = image.stat()
    except OSError:
        return None
    key = f"{image.resolve()}|{st.st_size}|{st.st_mtime_ns}|{size}"
    digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()
    fmt, ext = ("WEBP", ".webp") if features.check("webp") else ("PNG", ".png")
    target = Path(cache_dir) / digest[:2] / f"{digest}{ext}"
    if target.is_file():
        return target
    try:
        img = decode_image(image)
    except ImageSkipped:
        return None
    img.thumbnail((size, size), Image.BICUBIC)
    with atomic_path(target) as tmp:
        img.save(tmp, format=fmt, quality=85)
    return target
