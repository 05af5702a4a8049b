"""Model input preparation, one function per model family, each exactly as its reference does it.

WD14 (SmilingWolf's Space / imgutils, the canonical path): transparency composited onto white,
centred white square pad ((side - w) // 2, (side - h) // 2), PIL BICUBIC resize of the square to the
model's size (small images are upscaled), float32 0-255, RGB -> BGR, HWC.

DeepDanbooru (the WebUI's `deepbooru.tag_multi`): `convert("RGB")` (alpha dropped, as the host does),
the host's "resize and fill" to 512 x 512 (aspect-fit LANCZOS, the empty bands filled by stretching
the image's edge with a zero-height / zero-width box resize at PIL's default BICUBIC), float32 / 255,
RGB, HWC.

All functions are pure and thread-safe: the directory pipeline calls them from decoder threads.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

WHITE = (255, 255, 255)
BICUBIC = Image.Resampling.BICUBIC if hasattr(Image, "Resampling") else Image.BICUBIC
LANCZOS = Image.Resampling.LANCZOS if hasattr(Image, "Resampling") else Image.LANCZOS


def composite_on_white(image: Image.Image) -> Image.Image:
    """RGB with any transparency flattened onto white."""
    if image.mode == "RGB":
        return image
    if image.mode != "RGBA":
        image = image.convert("RGBA")
    canvas = Image.new("RGBA", image.size, WHITE + (255,))
    canvas.alpha_composite(image)
    return canvas.convert("RGB")


def pad_to_square(image: Image.Image, fill=WHITE) -> Image.Image:
    """The image centred on a square canvas of side max(w, h)."""
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    return canvas


def _pad_then_resize(image: Image.Image, size: int) -> Image.Image:
    """`pad_to_square(image).resize((size, size), BICUBIC)`, bit for bit, with less work for wide images.

    PIL resizes in two passes, horizontal then vertical, rounding to 8 bits in between. For a wide
    image the padding is whole white rows, which the horizontal pass leaves white; so the horizontal
    pass can run on the unpadded rows and the padding go in between the passes (at `size` wide
    instead of `side` wide). Tall images pad columns, which the horizontal pass mixes in: no shortcut.
    """
    w, h = image.size
    if w <= h or w == size:
        return pad_to_square(image).resize((size, size), BICUBIC)
    rows = image.resize((size, h), BICUBIC, box=(0, 0, w, h))  # horizontal pass only
    canvas = Image.new(rows.mode, (size, w), WHITE)
    canvas.paste(rows, (0, (w - h) // 2))
    return canvas.resize((size, size), BICUBIC)  # vertical pass only


def wd14_input(image: Image.Image, size: int) -> np.ndarray:
    """(size, size, 3) float32 BGR 0-255 for a WD14 ONNX tagger."""
    image = composite_on_white(image)
    square = image if image.size == (size, size) else _pad_then_resize(image, size)
    return np.ascontiguousarray(np.asarray(square, dtype=np.float32)[:, :, ::-1])


def resize_and_fill(image: Image.Image, width: int, height: int) -> Image.Image:
    """The WebUI's resize mode 2: fit inside (width, height), then stretch the edges over the bands."""
    ratio, src_ratio = width / height, image.width / image.height
    fit_w = width if ratio < src_ratio else image.width * height // image.height
    fit_h = height if ratio >= src_ratio else image.height * width // image.width
    fitted = image.resize((fit_w, fit_h), LANCZOS)
    out = Image.new("RGB", (width, height))
    left, top = width // 2 - fit_w // 2, height // 2 - fit_h // 2
    out.paste(fitted, (left, top))
    if ratio < src_ratio and top > 0:  # bands above and below
        out.paste(fitted.resize((width, top), BICUBIC, box=(0, 0, width, 0)), (0, 0))
        out.paste(fitted.resize((width, top), BICUBIC, box=(0, fit_h, width, fit_h)), (0, top + fit_h))
    elif ratio > src_ratio and left > 0:  # bands left and right
        out.paste(fitted.resize((left, height), BICUBIC, box=(0, 0, 0, height)), (0, 0))
        out.paste(fitted.resize((left, height), BICUBIC, box=(fit_w, 0, fit_w, height)), (left + fit_w, 0))
    return out


def deepdanbooru_input(image: Image.Image, size: int = 512) -> np.ndarray:
    """(size, size, 3) float32 RGB in 0..1 for the DeepDanbooru torch model."""
    filled = resize_and_fill(image.convert("RGB"), size, size)
    return np.asarray(filled, dtype=np.float32) / np.float32(255.0)
