"""Aesthetic gradients in the standalone backend (``alchemy txt2img --aesthetic NAME[:WEIGHT]``).

::

    with StandaloneAesthetic(adapter, embedding, options, clip_path=...) as aesthetic:
        images = generate_from(adapter, opts, encode_fn=aesthetic.encode_fn(base_encode_fn, opts.negative),
                               extra_params=aesthetic.infotext())

Entering wraps the model's ``encode_token_chunks`` (see :mod:`.patch`); leaving restores it. The tower is
the model's own ``CLIPTextModel``; SD1 takes CLIP's text projection from the CLIP model, SD2 its
checkpoint's own ``text_projection``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import torch

from ..errors import AlchemyError
from ..prompt import active_fixes
from .file import AestheticEmbedding
from .options import AestheticOptions
from .patch import MethodPatches
from .personalise import Personaliser
from .towers import HFTextTower

SD2_PROJECTION_KEY = "cond_stage_model.model.text_projection"


def standalone_tower(adapter, clip_path: Path | None = None) -> HFTextTower:
    """The text tower of a :class:`~extensions_lib.backend.standalone.StandaloneModel`."""
    if adapter.family == "sd2":
        projection = adapter.extras.get(SD2_PROJECTION_KEY)
        if projection is None:
            raise AlchemyError("this SD2 checkpoint has no text projection (cond_stage_model.model.text_projection)",
                               adapter.path, "use a complete SD2.x checkpoint")
    elif adapter.family == "sd1":
        if clip_path is None:
            raise AlchemyError("SD1 needs CLIP ViT-L/14's text projection for aesthetic gradients",
                               fix="pass --aesthetic-clip or put the model in the CLIP models folder "
                                   "(add --download to fetch it)")
        from .clip_models import load_text_projection

        projection = load_text_projection(clip_path)
    else:
        raise AlchemyError(f"aesthetic gradients support SD1 and SD2 models, not {adapter.family}")
    encoder = adapter.text_encoder
    info = adapter.text_encoders[0]
    return HFTextTower(encoder, adapter.family, projection,
                       embed_fn=lambda tokens: encoder.text_model.embeddings.token_embedding(tokens),
                       plain_embedding=info.token_embedding, start=info.id_start, end=info.id_end, pad=info.id_pad)


class StandaloneAesthetic:
    def __init__(self, adapter, embedding: AestheticEmbedding, options: AestheticOptions, *,
                 clip_path: Path | None = None, personaliser: Personaliser | None = None,
                 tower: HFTextTower | None = None):
        self.adapter = adapter
        self.embedding = embedding
        self.options = options
        self.settings = options.settings()
        self.personaliser = personaliser if personaliser is not None else Personaliser()
        self.tower = tower or standalone_tower(adapter, clip_path)
        self.personaliser.target(self.tower, embedding, self.settings)  # checks the width before generating
        self._patches = MethodPatches()
        self._personalise_now = False
        self._text_ids = adapter.tokenizer.tokenize([self.settings.text])[0] if self.settings.text else None

    def model_key(self) -> tuple:
        return ("standalone", self.adapter.checkpoint_hash, id(self.adapter.text_encoder))

    def __enter__(self) -> "StandaloneAesthetic":
        if self.settings.active:
            self._patches.wrap(self.adapter, "encode_token_chunks", self._wrap_chunks)
        return self

    def __exit__(self, *exc) -> None:
        self._patches.undo()

    def _wrap_chunks(self, original: Callable) -> Callable:
        def encode_token_chunks(tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
            z = original(tokens, clip_skip=clip_skip)
            if not self._personalise_now:
                return z
            return self.personaliser.personalise(
                self.tower, tokens, z, lambda: self.tower.embed(tokens), embedding=self.embedding,
                settings=self.settings, model_key=self.model_key(), fixes=active_fixes(), clip_skip=clip_skip,
                text_ids=self._text_ids)
        return encode_token_chunks

    def encode_fn(self, base: Callable | None, negative: str) -> Callable:
        """`base` (default ``encode_prompts``) personalising every call except the negative prompt's, when
        the options leave it alone (a prompt identical to the negative prompt counts as negative)."""
        if base is None:
            from ..prompt import encode_prompts as base

        def encode(adapter, prompts: Sequence[str], clip_skip: int = 1, **kwargs):
            skip = self.settings.leave_negative and all(p == negative for p in prompts)
            self._personalise_now = not skip
            try:
                return base(adapter, prompts, clip_skip=clip_skip, **kwargs)
            finally:
                self._personalise_now = False
        return encode

    def infotext(self) -> dict[str, str]:
        return self.options.infotext(self.embedding.digest) if self.settings.active else {}


def parse_aesthetic_arg(value: str) -> tuple[str, float | None]:
    """``NAME`` or ``NAME:WEIGHT`` (the weight overrides ``--aesthetic-weight``)."""
    name, sep, weight = value.rpartition(":")
    if not sep:
        return value, None
    try:
        return name, float(weight)
    except ValueError:
        return value, None

