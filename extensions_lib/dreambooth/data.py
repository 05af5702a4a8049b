"""The batches of a DreamBooth run: instance images, each followed by a class image of its concept.

Every micro-batch holds the instance samples first and then, for each instance sample whose concept has
prior preservation, one class image of that concept (diffusers' layout: the loss splits the batch there).
The order of the instance images is the trainer core's (:func:`~extensions_lib.train.batches.plan_epoch`),
and which class image joins is drawn from the loop's Python RNG, so a resumed run repeats exactly.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..errors import AlchemyError
from ..train.batches import Batch, MicroBatch, plan_epoch, steps_per_epoch
from ..train.dataset import ImageDataset, create_text, scan_folder
from ..train.latent_cache import LatentCache
from .concepts import Concept


@dataclass
class PriorBatch(Batch):
    prior: int = 0
    """How many samples at the end of the batch are class images (weighted by the prior loss weight)."""
    prior_rows: tuple[int, ...] = ()
    """For each class sample, the row of the instance sample it was drawn for."""


@dataclass
class ConceptData:
    concept: Concept
    instances: ImageDataset
    instance_latents: LatentCache
    classes: ImageDataset | None = None
    class_latents: LatentCache | None = None


class DreamBoothData:
    """A :class:`~extensions_lib.train.batches.BatchSource` over several concepts."""

    def __init__(self, concepts: Sequence[ConceptData], *, batch_size: int = 1, gradient_step: int = 1,
                 seed: int = 0, shuffle_tags: bool = False, tag_drop_out: float = 0.0):
        self.concepts = list(concepts)
        self.index: list[tuple[int, int]] = [(c, i) for c, data in enumerate(self.concepts)
                                             for i in range(len(data.instances))]
        offsets = [0]
        for data in self.concepts:
            offsets.append(offsets[-1] + len(data.instances))
        self._groups = [[offsets[c] + i for i in group] for c, data in enumerate(self.concepts)
                        for group in data.instances.groups()]
        self.batch_size = max(1, min(batch_size, len(self.index)))
        self.gradient_step = max(1, gradient_step)
        self.seed = seed
        self.shuffle_tags = shuffle_tags
        self.tag_drop_out = tag_drop_out

    @property
    def image_count(self) -> int:
        return len(self.index)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def content_hash(self) -> str:
        h = hashlib.sha256()
        for data in self.concepts:
            for part in (data.concept.instance_prompt, data.instances.content_hash, data.concept.class_prompt,
                         data.classes.content_hash if data.classes is not None else ""):
                h.update(part.encode("utf-8"))
                h.update(b"\0")
        return h.hexdigest()

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(self._groups, self.batch_size, self.gradient_step)

    def epoch(self, epoch: int) -> list[list[MicroBatch]]:
        return plan_epoch(self._groups, self.batch_size, self.gradient_step, self.seed, epoch)

    def make_batch(self, key: MicroBatch, rng: random.Random, generator: torch.Generator) -> PriorBatch:
        latents, prompts, captions = [], [], []
        class_latents, class_prompts, prior_rows = [], [], []
        for row, g in enumerate(key):
            c, i = self.index[g]
            data = self.concepts[c]
            caption = data.instances.entries[i].caption
            latents.append(data.instance_latents.latents(i, generator))
            prompts.append(create_text(data.concept.instance_prompt, caption, "", rng,
                                       shuffle_tags=self.shuffle_tags, tag_drop_out=self.tag_drop_out))
            captions.append(caption)
            if data.class_latents is not None:
                k = rng.randrange(len(data.classes))
                class_latents.append(data.class_latents.latents(k, generator))
                class_prompts.append(data.concept.class_prompt)
                prior_rows.append(row)
        return PriorBatch(latents=torch.stack(latents + class_latents), prompts=prompts + class_prompts,
                          captions=captions + class_prompts, indices=tuple(key), weights=None,
                          generator=generator, prior=len(class_latents),
                          prior_rows=tuple(prior_rows))


def build_dreambooth_data(adapter, options, concepts: Sequence[Concept],
                          on_progress: Callable[[int, int], None] | None = None) -> DreamBoothData:
    """Scan each concept's folders and cache their latents (class images must already be on disk)."""
    if options.seed < 0:
        raise ValueError("resolve the seed first (extensions_lib.train.options.resolve_seed)")
    if options.varsize:
        raise AlchemyError("DreamBooth trains at one size (instance and class images share each batch)",
                           fix="turn off 'variable size'; set width and height instead")
    size = dict(width=options.training_width, height=options.training_height)
    out = []
    for n, concept in enumerate(concepts):
        instances = scan_folder(concept.instance_dir, **size, filename_word_regex=options.filename_word_regex,
                                filename_join_string=options.filename_join_string)
        latents = LatentCache(instances, adapter, method=options.latent_sampling_method, seed=options.seed + 2 * n,
                              encode_batch=max(1, options.batch_size), on_progress=on_progress)
        data = ConceptData(concept, instances, latents)
        if concept.with_prior:
            data.classes = scan_folder(concept.class_dir, **size)
            data.class_latents = LatentCache(data.classes, adapter, method=options.latent_sampling_method,
                                             seed=options.seed + 2 * n + 1, encode_batch=max(1, options.batch_size))
        out.append(data)
    return DreamBoothData(out, batch_size=options.batch_size, gradient_step=options.gradient_step,
                         seed=options.seed, shuffle_tags=options.shuffle_tags, tag_drop_out=options.tag_drop_out)
