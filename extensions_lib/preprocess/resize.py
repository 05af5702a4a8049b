"""The WebUI's default preprocessing resize ("crop and resize", `images.resize_image` mode 1)."""
from __future__ import annotations

from PIL import Image


def fill_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """Size that covers the target with the image's aspect ratio, in the WebUI's integer arithmetic."""
    if target_w / target_h > width / height:
        return target_w, height * target_w // width
    return width * target_h // height, target_h


def crop_and_resize(img: Image.Image, target_w: int, target_h: int) -> Image.Image:
    """Scale (LANCZOS) until the target is covered, then keep the centre target_w x target_h."""
    w, h = fill_size(img.width, img.height, target_w, target_h)
    resized = img.resize((w, h), resample=Image.LANCZOS)
    # Same pixels as the WebUI's paste at (tw//2 - w//2, th//2 - h//2) onto a target-sized canvas.
    left, top = w // 2 - target_w // 2, h // 2 - target_h // 2
    return resized.crop((left, top, left + target_w, top + target_h))
