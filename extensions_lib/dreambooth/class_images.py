"""Class images for prior preservation, generated with the loaded model when fewer than asked exist.

Resumable: what is already in the folder counts, and image k is always made with seed ``seed + k``, so an
interrupted generation continues where it stopped and repeats nothing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from ..sampling.infotext import save_png
from ..sampling.txt2img import GenerationOptions, generate_from
from ..train.dataset import IMAGE_SUFFIXES
from ..train.rng import global_rng_preserved


def count_images(folder: Path) -> int:
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(1 for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def generate_class_images(adapter, concept, options, on_image: Callable[[Path], None] | None = None,
                          cancel=None) -> list[Path]:
    """Fill `concept.class_dir` up to `concept.num_class_images` images; the paths written."""
    folder = Path(concept.class_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = count_images(folder)
    written: list[Path] = []
    for k in range(have, concept.num_class_images):
        if cancel is not None and cancel.is_set():
            break
        opts = GenerationOptions(prompt=concept.class_prompt, negative=options.class_negative_prompt,
                                 steps=options.class_steps, sampler=options.class_sampler,
                                 cfg_scale=options.class_cfg_scale, seed=options.seed + k,
                                 width=options.training_width, height=options.training_height)
        with global_rng_preserved():
            image = generate_from(adapter, opts)[0]
        path = folder / f"class-{k:05d}.png"
        while path.exists():  # a user's own file of that name: never overwrite it
            path = path.with_name(path.stem + "-a.png")
        save_png(image, path)
        written.append(path)
        if on_image is not None:
            on_image(path)
    return written
