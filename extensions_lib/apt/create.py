"""Create the pair ``{name}`` and ``{name}-neg`` from their init texts (DreamArtist's Create tab).

The vectors start as textual inversion's do (:func:`~extensions_lib.embeddings.create.init_vectors`); the
negative ones get Gaussian noise of `neg_noise` so the pair does not start symmetric. Both names are
checked, and both files found free, before either is written.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch

from ..embeddings.create import check_free, check_name, init_vectors
from ..formats.embedding import Embedding, write_embedding
from .options import NEG_SUFFIX, AptCreateOptions


def _noisy(vectors, sigma: float, generator: torch.Generator):
    if isinstance(vectors, dict):
        return {k: _noisy(v, sigma, generator) for k, v in vectors.items()}
    return vectors + sigma * torch.randn(vectors.shape, generator=generator, dtype=vectors.dtype)


def create_pair(adapter, options: AptCreateOptions, *, directory: str | os.PathLike) -> tuple[Path, Path]:
    """Write the positive and negative embeddings into `directory`; returns their paths."""
    name = check_name(options.name)
    neg_name = check_name(name + NEG_SUFFIX)
    directory = Path(directory)
    sdxl = any(info.key for info in adapter.text_encoders)
    suffix = ".safetensors" if sdxl or options.file_format == "safetensors" else ".pt"
    targets = [directory / f"{n}{suffix}" for n in (name, neg_name)]
    for n, target in zip((name, neg_name), targets):
        check_free(directory, n, target, options.overwrite)
    pos = init_vectors(adapter, options.init_text, options.num_vectors_per_token)
    neg = init_vectors(adapter, options.init_text_neg, options.num_vectors_per_token_neg)
    seed = options.seed if options.seed >= 0 else random.SystemRandom().randrange(2**31)
    if options.neg_noise:
        neg = _noisy(neg, options.neg_noise, torch.Generator().manual_seed(seed))
    for n, vectors, target in zip((name, neg_name), (pos, neg), targets):
        write_embedding(Embedding(name=n, vectors=vectors, step=0), target)
    return targets[0], targets[1]
