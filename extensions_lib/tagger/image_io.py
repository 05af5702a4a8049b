"""Decode whatever a dataset folder holds into an RGB or RGBA image, or say why not.

Datasets collect odd files: zero-byte downloads, truncated JPEGs, palette and LA PNGs, 16-bit scans,
CMYK JPEGs, animated GIF/WebP, text files named `.png`, and the occasional 30000 x 30000 pixel image.
:func:`decode_image` turns each into a fully loaded RGB/RGBA `PIL.Image` (first frame, EXIF
orientation applied) or raises :class:`ImageSkipped` with a one-line reason for the run summary.
The pixel-count limit is checked from the header before any pixel is decoded, so a decompression bomb
costs nothing. Nothing here touches PIL's global settings.
"""
from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 89_478_485  # PIL's own default limit (about 9459 x 9459)
_ORIENTATION = 0x0112  # EXIF tag


class ImageSkipped(Exception):
    """This file cannot be tagged; `reason` says why in a few words."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def image_extensions() -> frozenset[str]:
    """Lower-case extensions (with the dot) of every format PIL can open here."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def list_images(root: str | os.PathLike, *, recursive: bool = False,
                extensions: Iterable[str] | None = None) -> list[Path]:
    """Image files under `root` (by extension, hidden files skipped), sorted for a stable order."""
    root = Path(root)
    exts = frozenset(extensions) if extensions is not None else image_extensions()
    pattern = root.rglob("*") if recursive else root.glob("*")
    found = []
    for path in pattern:
        rel = path.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if path.suffix.lower() in exts and path.is_file():
            found.append(path)
    return sorted(found)


def _sixteen_bit_to_rgb(im: Image.Image) -> Image.Image:
    # PIL's convert() clips 16-bit values at 255 (a mostly white image); scale the range instead.
    arr = np.asarray(im)
    if arr.dtype.kind == "f":
        top = 1.0 if arr.size and float(np.nanmax(arr)) <= 1.0 else 255.0
        arr8 = np.clip(np.nan_to_num(arr) * (255.0 / top), 0, 255).round().astype(np.uint8)
    else:
        arr = arr.astype(np.int64)
        if arr.size and arr.max() > 255:
            arr = arr // 257  # 0..65535 -> 0..255, exact at both ends
        arr8 = np.clip(arr, 0, 255).astype(np.uint8)
    return Image.fromarray(arr8, "L").convert("RGB")


def to_rgb_or_rgba(im: Image.Image) -> Image.Image:
    """RGB, or RGBA when the image carries transparency (alpha channel, or a palette/tRNS entry)."""
    mode = im.mode
    if mode in ("RGB", "RGBA"):
        return im
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _sixteen_bit_to_rgb(im)
    has_alpha = mode in ("LA", "La", "PA", "RGBa") or "transparency" in im.info
    if mode == "RGBa":
        return im.convert("RGBA")
    return im.convert("RGBA" if has_alpha else "RGB")


def decode_image(source: str | os.PathLike | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS,
                 name: str | None = None) -> Image.Image:
    """Fully decoded first frame as RGB/RGBA; raises :class:`ImageSkipped` with a reason otherwise."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        try:
            data = Path(source).read_bytes()
        except OSError as exc:
            raise ImageSkipped(f"unreadable ({exc.strerror or exc})") from None
    if not data:
        raise ImageSkipped("empty file (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageSkipped(f"too large to decode safely ({exc})") from None
    except Image.UnidentifiedImageError:
        raise ImageSkipped("not an image PIL can read (corrupt or unsupported format)") from None
    except Exception as exc:  # a broken header can raise almost anything from a plugin
        raise ImageSkipped(f"corrupt header ({type(exc).__name__}: {exc})") from None
    width, height = im.size
    if width <= 0 or height <= 0:
        raise ImageSkipped(f"invalid size {width}x{height}")
    if width * height > max_pixels:
        raise ImageSkipped(f"{width}x{height} = {width * height} pixels is over the limit of {max_pixels} "
                           f"(raise --max-pixels to tag it)")
    try:
        if getattr(im, "n_frames", 1) > 1:
            im.seek(0)
        im.load()
        if im.getexif().get(_ORIENTATION, 1) != 1:  # exif_transpose would copy even when upright
            im = ImageOps.exif_transpose(im)
    except Exception as exc:  # truncated data, bad compression streams, broken EXIF ...
        text = str(exc) or type(exc).__name__
        if "truncated" in text:
            raise ImageSkipped(f"truncated file ({text})") from None
        raise ImageSkipped(f"corrupt image data ({type(exc).__name__}: {text})") from None
    try:
        return to_rgb_or_rgba(im)
    except Exception as exc:
        raise ImageSkipped(f"unsupported colour mode {im.mode} ({exc})") from None
