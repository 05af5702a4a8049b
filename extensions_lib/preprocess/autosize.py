"""Auto-sized crop (the WebUI's "multicrop"): pick the output size that best fits each image.

Candidates are every (w, h) in range(min_dim, max_dim + 1, 64) squared whose area lies within the
bounds and whose aspect-ratio error is at most the threshold; "maximize-area" takes the largest
area (ties: smaller error), "minimize-error" the smallest error (ties: larger area). The image is
then centre-cropped to that aspect ratio and resized with LANCZOS in one step.
"""
from __future__ import annotations

from PIL import Image

CANDIDATE_STEP = 64


def aspect_error(image_w: int, image_h: int, w: int, h: int) -> float:
    """0 when (w, h) has the image's aspect ratio; approaches 1 as they diverge."""
    r = (image_w / image_h) / (w / h)
    return 1.0 - (r if r < 1 else 1.0 / r)


def choose_size(image_w: int, image_h: int, *, min_dim: int, max_dim: int, min_area: int, max_area: int,
                objective: str, threshold: float) -> tuple[int, int] | None:
    """The best candidate (w, h), or None when no candidate is within the threshold and bounds."""
    sides = range(min_dim, max_dim + 1, CANDIDATE_STEP)
    fits = [(w, h) for w in sides for h in sides
            if min_area <= w * h <= max_area and aspect_error(image_w, image_h, w, h) <= threshold]
    if not fits:
        return None
    if objective == "maximize-area":
        return max(fits, key=lambda wh: (wh[0] * wh[1], -aspect_error(image_w, image_h, *wh)))
    if objective == "minimize-error":
        return max(fits, key=lambda wh: (-aspect_error(image_w, image_h, *wh), wh[0] * wh[1]))
    raise ValueError(f"unknown objective {objective!r}")


def center_crop_resize(img: Image.Image, w: int, h: int) -> Image.Image:
    """Centre crop to w:h (fractional box, no rounding drift) and resize to exactly w x h."""
    iw, ih = img.size
    if ih / h < iw / w:
        sw = w * ih / h
        box = ((iw - sw) / 2, 0, iw - (iw - sw) / 2, ih)
    else:
        sh = h * iw / w
        box = (0, (ih - sh) / 2, iw, ih - (ih - sh) / 2)
    return img.resize((w, h), resample=Image.LANCZOS, box=box)
