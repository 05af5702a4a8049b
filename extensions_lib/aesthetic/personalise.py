"""Personalise text conditioning towards an aesthetic embedding, and remember the result.

For one 77-token chunk: float32 copies of the text tower's weights take ``steps`` Adam steps (learning rate
``lr``) maximising the cosine similarity between the chunk's projected text feature and the target (the
normalised embedding, optionally rotated towards or away from a text by ``slerp_angle``, as the
original's "text for imgs"). The personalised tower's conditioning ``zn`` is then blended into the
normal one: ``lerp`` or, with ``slerp``, spherical interpolation per token vector, by ``weight``.

Differences from the original extension, on purpose: the loaded checkpoint's own text tower is
personalised (the original used a separate OpenAI CLIP, which drifts fine-tuned models even with no
steps); only the tower's weights after the token embedding are copied (no CLIP vision or text model is
loaded per call); each chunk row is optimised on its own, so identical rows in a batch cost one
optimisation; slerp runs over each token's vector (the original's norm ran over the token axis).

``zn`` is cached per (model, chunk ids, embedding vectors spliced in, clip skip, embedding, steps, lr, text,
angle, text direction): weight and the lerp/slerp choice are applied afterwards, so changing them, or
generating again, runs no optimisation.
"""
from __future__ import annotations

import collections
import contextlib
import hashlib
from dataclasses import dataclass
from typing import Any, Hashable, Iterator, Sequence

import torch

from ..errors import AlchemyError
from .file import AestheticEmbedding
from .towers import TextTower


@dataclass(frozen=True)
class Settings:
    """What a generation asks for (see :class:`extensions_lib.aesthetic.options.AestheticOptions`)."""

    weight: float = 0.9
    steps: int = 5
    lr: float = 1e-4
    slerp: bool = False
    text: str = ""
    slerp_angle: float = 0.1
    text_negative: bool = False
    leave_negative: bool = True

    @property
    def active(self) -> bool:
        """The original's rule: nothing happens unless steps, learning rate and weight are all non-zero."""
        return self.steps > 0 and self.lr != 0 and self.weight != 0

    def optimisation_key(self) -> tuple:
        return (self.steps, float(self.lr), self.text, float(self.slerp_angle) if self.text else None,
                self.text_negative if self.text else None)


def normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of the last-axis vectors of `a` and `b` (their lengths interpolate linearly
    in the weights); falls back to lerp where they are (nearly) parallel."""
    dot = (normalise(a) * normalise(b)).sum(-1, keepdim=True).clamp(-1.0, 1.0)
    omega = torch.acos(dot)
    sin = torch.sin(omega)
    flat = sin.abs() < 1e-6
    safe = torch.where(flat, torch.ones_like(sin), sin)
    wa = torch.where(flat, torch.full_like(sin, 1.0 - t), torch.sin((1.0 - t) * omega) / safe)
    wb = torch.where(flat, torch.full_like(sin, t), torch.sin(t * omega) / safe)
    return wa * a + wb * b


def blend(z: torch.Tensor, zn: torch.Tensor, settings: Settings) -> torch.Tensor:
    zn = zn.to(z.device, z.dtype)
    if settings.slerp:
        return slerp(z.float(), zn.float(), settings.weight).to(z.dtype)
    return (1.0 - settings.weight) * z + settings.weight * zn


def fixes_signature(fixes: Sequence[Any] | None) -> tuple:
    """What textual-inversion vectors a chunk row had spliced in: (offset, name, vector digest) each."""
    out = []
    for offset, payload in fixes or ():
        vec = getattr(payload, "vec", None)
        if not isinstance(vec, torch.Tensor):
            vec = getattr(payload, "vectors", None)
        if isinstance(vec, dict):
            vec = vec.get("") if "" in vec else next(iter(vec.values()))
        digest = hashlib.sha1(vec.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest() \
            if isinstance(vec, torch.Tensor) else repr(vec)
        out.append((int(offset), str(getattr(payload, "name", "")), digest))
    return tuple(out)


@contextlib.contextmanager
def grad_enabled(device: torch.device) -> Iterator[None]:
    """Gradients on, float32, even inside the host's ``no_grad``/``inference_mode`` and autocast."""
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        yield


class Personaliser:
    """Runs and caches personalisation. ``optimisations`` counts rows actually optimised (tests, bench)."""

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._cache: collections.OrderedDict[Hashable, torch.Tensor] = collections.OrderedDict()
        self.optimisations = 0

    def clear(self) -> None:
        self._cache.clear()

    @property
    def cached(self) -> int:
        return len(self._cache)

    # --- target ------------------------------------------------------------------------------------
    def target(self, tower: TextTower, embedding: AestheticEmbedding, settings: Settings,
               text_ids: list[int] | None = None) -> torch.Tensor:
        """(1, dim) normalised direction to move the text features towards."""
        if embedding.dim != tower.dim:
            model = {"sd1": "SD1 (768)", "sd2": "SD2 (1024)"}.get(tower.family, tower.family)
            raise AlchemyError(f"aesthetic embedding {embedding.name!r} is {embedding.dim}-dimensional, but this "
                               f"{model} model's CLIP space is {tower.dim}-dimensional",
                               fix="create the embedding with the CLIP model of this model family "
                                   "(ViT-L/14 for SD1, OpenCLIP ViT-H/14 for SD2)")
        image = normalise(embedding.vector.to(tower.device, torch.float32)[None])
        if not settings.text:
            return image
        tokens = tower.chunk(text_ids or [])
        with grad_enabled(tower.device), torch.no_grad():
            _, features = tower.run(tower.weights(), tower.embed_plain(tokens).float(), tokens)
        text = normalise(features)
        if settings.text_negative:
            text = normalise(image - text)
        return normalise(slerp(image, text, settings.slerp_angle))

    # --- one row ------------------------------------------------------------------------------------
    def optimise_row(self, tower: TextTower, tokens: torch.Tensor, embeds: torch.Tensor, target: torch.Tensor,
                     settings: Settings, clip_skip: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor], list[float]]:
        """Personalise one chunk (tokens (1, 77), embeds (1, 77, C)): (zn (77, C) float32, the tuned
        weights, cosine similarity before each step and after the last)."""
        self.optimisations += 1
        with grad_enabled(tower.device):
            params = {k: v.requires_grad_(True) for k, v in tower.weights().items()}
            embeds = embeds.detach().float()
            optimiser = torch.optim.Adam(params.values(), lr=settings.lr)
            trace = []
            for _ in range(settings.steps):
                _, features = tower.run(params, embeds, tokens, clip_skip)
                similarity = torch.nn.functional.cosine_similarity(features, target.to(features.device), dim=-1).mean()
                trace.append(float(similarity.detach()))
                optimiser.zero_grad(set_to_none=True)
                (-similarity).backward()
                optimiser.step()
            with torch.no_grad():
                cond, features = tower.run(params, embeds, tokens, clip_skip)
                trace.append(float(torch.nn.functional.cosine_similarity(features, target.to(features.device),
                                                                         dim=-1).mean()))
            del optimiser
        return cond[0].detach(), {k: v.detach() for k, v in params.items()}, trace

    # --- a chunk batch ---------------------------------------------------------------------------------
    def personalise(self, tower: TextTower, tokens: torch.Tensor, z: torch.Tensor, embeds_fn, *,
                    embedding: AestheticEmbedding, settings: Settings, model_key: Hashable,
                    fixes: Sequence[Sequence[Any]] | None = None, clip_skip: int = 1,
                    text_ids: list[int] | None = None) -> torch.Tensor:
        """`z` (N, 77, C), the chunk batch's normal conditioning, blended with each row's personalised one.

        embeds_fn() -> (N, 77, C) token embeddings of the batch (called only on a cache miss, once).
        """
        if not settings.active:
            return z
        tokens = tokens.to("cpu")
        keys = [(model_key, tuple(row.tolist()), fixes_signature(fixes[i] if fixes else None), clip_skip,
                 embedding.digest, settings.optimisation_key()) for i, row in enumerate(tokens)]
        embeds, target, rows = None, None, []
        for i, key in enumerate(keys):
            zn = self._cache.get(key)
            if zn is None:
                if embeds is None:
                    with grad_enabled(tower.device), torch.no_grad():
                        embeds = embeds_fn().detach().float()
                    target = self.target(tower, embedding, settings, text_ids)
                zn, _, _ = self.optimise_row(tower, tokens[i:i + 1], embeds[i:i + 1], target, settings, clip_skip)
                self._store(key, zn)
            else:
                self._cache.move_to_end(key)
            rows.append(zn)
        return blend(z, torch.stack(rows).to(z.device), settings)

    def _store(self, key: Hashable, zn: torch.Tensor) -> None:
        self._cache[key] = zn
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
