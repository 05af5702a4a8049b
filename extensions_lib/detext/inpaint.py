"""Paint detected text out: a dilated mask of the boxes, OpenCV inpainting, only masked pixels pasted back.

Repeated detection passes catch text the first fill left legible (detextify's loop); each pass keeps
every pixel outside its mask exactly as it was, so the colour shift detextify users saw outside text
(its issue #17) cannot happen.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image

METHODS = ("telea", "ns")


def text_mask(size: tuple[int, int], boxes: Sequence, dilate: int) -> np.ndarray:
    """uint8 mask (255 = text) of the boxes' polygons, grown by `dilate` pixels."""
    from ..faces.yunet import import_cv2

    cv2 = import_cv2()
    mask = np.zeros((size[1], size[0]), np.uint8)
    for box in boxes:
        cv2.fillPoly(mask, [np.round(np.asarray(box.points)).astype(np.int32)], 255)
    if dilate > 0:
        mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * dilate + 1, 2 * dilate + 1)))
    return mask


def inpaint(image: Image.Image, mask: np.ndarray, *, method: str = "telea", radius: int = 5) -> Image.Image:
    """`image` with the masked pixels filled from their surroundings; every other pixel unchanged."""
    from ..faces.yunet import import_cv2

    cv2 = import_cv2()
    rgb = np.asarray(image.convert("RGB"))
    flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
    filled = cv2.inpaint(np.ascontiguousarray(rgb[:, :, ::-1]), mask, radius, flag)[:, :, ::-1]
    out = np.where(mask[:, :, None] > 0, filled, rgb)
    result = Image.fromarray(np.ascontiguousarray(out))
    if image.mode == "RGBA":
        result.putalpha(image.getchannel("A"))
    return result


@dataclass
class Detexted:
    image: Image.Image
    mask: np.ndarray                          # union of every pass's mask
    boxes: list = field(default_factory=list)  # per pass
    passes: int = 0


def remove_text(image: Image.Image, detector, *, passes: int = 3, dilate: int = 4, method: str = "telea",
                radius: int = 5, inpainter=None) -> Detexted:
    """Detect and inpaint up to `passes` times, stopping when nothing is found. `inpainter(image, mask)`
    replaces OpenCV (e.g. :class:`.sd_inpaint.SdInpainter`); it must change only masked pixels."""
    current = image
    union = np.zeros((image.height, image.width), np.uint8)
    result = Detexted(image, union)
    for _ in range(passes):
        boxes = detector.detect(current)
        if not boxes:
            break
        mask = text_mask(current.size, boxes, dilate)
        current = inpainter(current, mask) if inpainter else inpaint(current, mask, method=method, radius=radius)
        union |= mask
        result.boxes.append(boxes)
        result.passes += 1
    result.image = current
    return result
