"""Batches for the training loop: which images each optimizer step sees, and what a batch holds.

The order of an epoch is a pure function of (seed, epoch, effective batch size): nothing about it has to
be saved for an exact resume, and ``batch_size=4, gradient_step=1`` sees the very same images per step as
``batch_size=2, gradient_step=2``. Images of one size are grouped (needed for "variable size"); each
group is shuffled and cut into effective batches, a short last batch of a group is filled up with other
images of that group (so every image is seen every epoch), and the batches are shuffled.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Protocol, Sequence

import torch

from .dataset import ImageDataset, Template, create_text, load_template, prompt_rng_choice, scan_folder
from .latent_cache import LatentCache

MicroBatch = tuple[int, ...]


@dataclass
class Batch:
    """One micro-batch. Tensors are on the CPU until :meth:`to`."""

    latents: torch.Tensor
    """(B, C, h, w) scaled VAE latents."""
    prompts: list[str]
    """Template lines filled with the captions (what the text encoder sees)."""
    captions: list[str]
    indices: MicroBatch
    weights: torch.Tensor | None
    """(B, C, h, w) alpha loss weight (mean 1), or None when not used."""
    generator: torch.Generator
    """The loop's generator (CPU): draw noise and timesteps from it so a resumed run repeats exactly."""

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> "Batch":
        weights = None if self.weights is None else self.weights.to(device)
        return replace(self, latents=self.latents.to(device, dtype) if dtype else self.latents.to(device),
                       weights=weights)


class BatchSource(Protocol):
    """Where a method's batches come from (:class:`TrainingData`, or a method's own mix of datasets)."""

    image_count: int
    content_hash: str
    steps_per_epoch: int

    def epoch(self, epoch: int) -> list[list[MicroBatch]]:
        """For each optimizer step of `epoch`, its micro-batches (as many as gradient accumulation)."""
        ...

    def make_batch(self, key: MicroBatch, rng: random.Random, generator: torch.Generator) -> Batch:
        """Build one micro-batch; all randomness from `rng` (prompts) and `generator` (tensors)."""
        ...


def plan_epoch(groups: Sequence[Sequence[int]], batch_size: int, gradient_step: int, seed: int,
               epoch: int) -> list[list[MicroBatch]]:
    """The micro-batches of every optimizer step of one epoch (see the module docstring)."""
    rng = random.Random(f"alchemy-epoch/{seed}/{epoch}")
    effective = batch_size * gradient_step
    steps: list[list[int]] = []
    for group in groups:
        order = list(group)
        rng.shuffle(order)
        for start in range(0, len(order), effective):
            chunk = order[start:start + effective]
            if len(chunk) < effective:
                others = [i for i in order if i not in chunk] or chunk
                while len(chunk) < effective:
                    chunk.append(others[rng.randrange(len(others))])
            steps.append(chunk)
    rng.shuffle(steps)
    return [[tuple(s[k * batch_size:(k + 1) * batch_size]) for k in range(gradient_step)] for s in steps]


def steps_per_epoch(groups: Sequence[Sequence[int]], batch_size: int, gradient_step: int) -> int:
    effective = batch_size * gradient_step
    return sum(math.ceil(len(g) / effective) for g in groups)


class TrainingData:
    """A dataset with cached latents and a prompt template, served as :class:`Batch` es."""

    def __init__(self, dataset: ImageDataset, latents: LatentCache, template: Template, *, name: str = "",
                 batch_size: int = 1, gradient_step: int = 1, seed: int = 0, shuffle_tags: bool = False,
                 tag_drop_out: float = 0.0):
        self.dataset = dataset
        self.latents = latents
        self.template = template
        self.name = name
        # As the WebUI: a batch larger than the dataset would only repeat images.
        self.batch_size = max(1, min(batch_size, len(dataset)))
        self.gradient_step = max(1, gradient_step)
        self.seed = seed
        self.shuffle_tags = shuffle_tags
        self.tag_drop_out = tag_drop_out
        self._groups = dataset.groups()

    @property
    def image_count(self) -> int:
        return len(self.dataset)

    @property
    def content_hash(self) -> str:
        return self.dataset.content_hash

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self._groups, self.batch_size, self.gradient_step)

    @property
    def prompts_are_static(self) -> bool:
        """True when each image always gets the same prompt (one template line, no tag shuffle or dropout):
        a method may then encode each image's prompt once and cache the conditioning."""
        return len(self.template.lines) == 1 and not self.shuffle_tags and not self.tag_drop_out

    def epoch(self, epoch: int) -> list[list[MicroBatch]]:
        return plan_epoch(self._groups, self.batch_size, self.gradient_step, self.seed, epoch)

    def prompt(self, index: int, rng: random.Random) -> str:
        line = prompt_rng_choice(self.template.lines, rng)
        return create_text(line, self.dataset.entries[index].caption, self.name, rng,
                           shuffle_tags=self.shuffle_tags, tag_drop_out=self.tag_drop_out)

    def make_batch(self, key: MicroBatch, rng: random.Random, generator: torch.Generator) -> Batch:
        latents = [self.latents.latents(i, generator) for i in key]
        prompts = [self.prompt(i, rng) for i in key]
        weights = [self.latents.weight(i) for i in key]
        return Batch(latents=torch.stack(latents), prompts=prompts,
                     captions=[self.dataset.entries[i].caption for i in key], indices=tuple(key),
                     weights=None if weights[0] is None else torch.stack(weights), generator=generator)


def build_training_data(adapter, options, *, name: str, require_name: bool,
                        exclude: Callable[[Path], bool] | None = None,
                        on_progress: Callable[[int, int], None] | None = None) -> TrainingData:
    """Scan `options.data_root`, read the template and encode the latents: everything a method needs.

    options: a :class:`~extensions_lib.train.options.TrainingOptions` (seed already resolved).
    name: what ``[name]`` becomes. require_name: every template line must contain ``[name]``.
    """
    if options.seed < 0:
        raise ValueError("resolve the seed first (extensions_lib.train.options.resolve_seed)")
    template = load_template(options.template_file, require_name=require_name)
    dataset = scan_folder(options.data_root, width=options.training_width, height=options.training_height,
                          varsize=options.varsize, filename_word_regex=options.filename_word_regex,
                          filename_join_string=options.filename_join_string, exclude=exclude)
    cache = LatentCache(dataset, adapter, method=options.latent_sampling_method, seed=options.seed,
                        use_weight=options.use_weight, encode_batch=max(1, options.batch_size),
                        on_progress=on_progress)
    return TrainingData(dataset, cache, template, name=name, batch_size=options.batch_size,
                        gradient_step=options.gradient_step, seed=options.seed, shuffle_tags=options.shuffle_tags,
                        tag_drop_out=options.tag_drop_out)
