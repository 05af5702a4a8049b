"""A small synthetic dataset for the demo: every image shows the same made-up object.

The object (a red-and-white checkered disc) is drawn at varying positions, sizes and backgrounds, so
an embedding trained on the set has one consistent concept to learn. Captions describe only the
varying parts, in the comma-separated tag style the trainers' ``[filewords]`` expect.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image, ImageDraw

from .atomic import atomic_path, write_text

BACKGROUNDS = {"blue background": (40, 70, 160), "green background": (50, 140, 60),
               "grey background": (128, 128, 128), "yellow background": (220, 200, 60)}


def draw_sample(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    name, colour = rng.choice(sorted(BACKGROUNDS.items()))
    img = Image.new("RGB", (size, size), colour)
    draw = ImageDraw.Draw(img)
    radius = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(radius, size - radius), rng.randint(radius, size - radius)
    cell = max(2, radius // 3)
    for y in range(cy - radius, cy + radius):
        for x in range(cx - radius, cx + radius):
            if (x - cx) ** 2 + (y - cy) ** 2 <= radius ** 2:
                red = ((x - cx + radius) // cell + (y - cy + radius) // cell) % 2 == 0
                draw.point((x, y), fill=(200, 30, 30) if red else (245, 245, 245))
    where = "centered" if abs(cx - size / 2) < size / 8 and abs(cy - size / 2) < size / 8 else "off-center"
    return img, f"{name}, {where}, simple background"


def make_sample_dataset(folder: str | Path, count: int = 8, size: int = 128, seed: int = 0) -> Path:
    """Write `count` PNG images with `.txt` captions into `folder` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    for i in range(count):
        img, caption = draw_sample(rng, size)
        with atomic_path(folder / f"sample-{i:02d}.png") as tmp:
            img.save(tmp, format="PNG")
        write_text(folder / f"sample-{i:02d}.txt", caption)
    return folder
