"""The training data of APT: the trainer core's batches plus each prompt's negative twin, DreamArtist's
mask weights and, for the reconstruction loss, the images' pixels (kept on the CPU, moved per batch)."""
from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from ..train.batches import Batch, MicroBatch, TrainingData
from .att_mask import load_mask_weight, mask_path


@dataclass
class AptBatch(Batch):
    negative_prompts: list[str] | None = None
    """Each prompt with the name replaced by ``{name}-neg`` (same template line and caption)."""
    pixels: torch.Tensor | None = None
    """(B, 3, H, W) images in [-1, 1] on the CPU, for the reconstruction loss; None when it is off."""


def name_pattern(name: str) -> re.Pattern:
    """`name` as a whole word (not inside another word or name, e.g. ``x`` in ``x-neg`` or ``xy``)."""
    return re.compile(rf"(?<![\w-]){re.escape(name)}(?![\w-])")


class AptData:
    """A :class:`~extensions_lib.train.batches.BatchSource` over a :class:`TrainingData` (same epochs, same
    draws from the RNGs) whose batches are :class:`AptBatch` es."""

    def __init__(self, base: TrainingData, neg_name: str, *, masks: bool, pixels: bool):
        self.base = base
        self.dataset = base.dataset
        self.template = base.template
        self.neg_name = neg_name
        self._name = name_pattern(base.name)
        entries = base.dataset.entries
        paths = [mask_path(e.path) if masks else None for e in entries]
        self.mask_files = [p for p in paths if p is not None]
        self._masks = [None if p is None else load_mask_weight(p, e.size) for p, e in zip(paths, entries)]
        self._pixels = [base.dataset.load(i)[0] for i in range(len(entries))] if pixels else None

    image_count = property(lambda self: self.base.image_count)
    content_hash = property(lambda self: self.base.content_hash)
    steps_per_epoch = property(lambda self: self.base.steps_per_epoch)

    def epoch(self, epoch: int) -> list[list[MicroBatch]]:
        return self.base.epoch(epoch)

    def negative_prompt(self, prompt: str) -> str:
        return self._name.sub(lambda _: self.neg_name, prompt)

    def make_batch(self, key: MicroBatch, rng: random.Random, generator: torch.Generator) -> AptBatch:
        batch = self.base.make_batch(key, rng, generator)
        weights = batch.weights
        if any(self._masks[i] is not None for i in key):
            shape = batch.latents.shape[-2:]
            masks = torch.stack([self._masks[i] if self._masks[i] is not None else torch.ones(1, *shape) for i in key])
            weights = masks if weights is None else weights * masks
        pixels = None if self._pixels is None else torch.stack([self._pixels[i] for i in key])
        return AptBatch(latents=batch.latents, prompts=batch.prompts, captions=batch.captions, indices=batch.indices,
                        weights=weights, generator=batch.generator,
                        negative_prompts=[self.negative_prompt(p) for p in batch.prompts], pixels=pixels)
