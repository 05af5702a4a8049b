"""The loaded model's text tower, run with substitute weights: what personalisation optimises.

A tower gives (a) the token embeddings of a chunk through the model's own token-embedding module (so
textual-inversion vectors spliced in there are part of the input), (b) float32 copies of the tower's
weights after the token embedding (position embedding, transformer layers, final norm) and (c) a forward
pass with such copies through the model's own modules (``torch.func.functional_call``): nothing is
deep-copied, the host's hooks are left alone, and the model itself is never written to.

Two layouts: transformers ``CLIPTextModel`` (SD1 in the WebUI and both families in the standalone
backend, where SD2's OpenCLIP tower is held in that layout) and the OpenCLIP tower ldm keeps for SD2 in
the WebUI. ``features`` are the projected pooled outputs (the end token after the final norm, times the
text projection), the space CLIP image features live in.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

from ..backend.text_encoding import hidden_state_index

Params = dict[str, torch.Tensor]


def _sub(params: Params, prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in params.items() if k.startswith(prefix)}


def _copies(prefix: str, module: nn.Module) -> Params:
    return {f"{prefix}{name}": p.detach().to(torch.float32).clone() for name, p in module.named_parameters()}


def _end_positions(tokens: torch.Tensor) -> torch.Tensor:
    # The end token has the highest id, and the first one is taken (SD1 pads with it, SD2 with 0).
    return tokens.argmax(dim=-1)


class TextTower:
    """Base: ``embed_fn`` (model's token embedding, fixes applied), ``plain_embed`` (no fixes),
    ``projection`` (width, dim)."""

    family: str
    projection: torch.Tensor

    def __init__(self, family: str, embed_fn: Callable[[torch.Tensor], torch.Tensor], plain_embedding: nn.Module,
                 projection: torch.Tensor, start: int, end: int, pad: int):
        self.family = family
        self.embed_fn = embed_fn
        self.plain_embedding = plain_embedding
        self.projection = projection.detach().to(torch.float32)
        self.ids = (start, end, pad)

    @property
    def device(self) -> torch.device:
        return self.plain_embedding.weight.device

    @property
    def dim(self) -> int:
        return int(self.projection.shape[1])

    def chunk(self, ids: list[int]) -> torch.Tensor:
        """(1, 77) ids of a text: start, the first 75 tokens, end, then padding."""
        start, end, pad = self.ids
        ids = list(ids[:75])
        full = [start] + ids + [end] + [pad if pad != end else end] * (75 - len(ids))
        return torch.tensor([full], dtype=torch.long)

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_fn(tokens.to(self.device))

    def embed_plain(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.plain_embedding(tokens.to(self.device))

    def weights(self) -> Params:
        raise NotImplementedError

    def run(self, params: Params, embeds: torch.Tensor, tokens: torch.Tensor,
            clip_skip: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(conditioning (N, 77, C) for `clip_skip`, features (N, dim)), all float32."""
        raise NotImplementedError


class HFTextTower(TextTower):
    """A transformers ``CLIPTextModel``."""

    def __init__(self, text_model: nn.Module, family: str, projection: torch.Tensor, *,
                 embed_fn: Callable | None = None, plain_embedding: nn.Module | None = None,
                 start: int = 49406, end: int = 49407, pad: int = 49407):
        inner = text_model.text_model
        self.inner = inner
        token_embedding = inner.embeddings.token_embedding
        super().__init__(family, embed_fn or token_embedding, plain_embedding or _innermost(token_embedding),
                         projection, start, end, pad)

    def weights(self) -> Params:
        inner = self.inner
        params = {"pos": inner.embeddings.position_embedding.weight.detach().to(torch.float32).clone()}
        params.update(_copies("enc.", inner.encoder))
        params.update(_copies("ln.", inner.final_layer_norm))
        return params

    def run(self, params, embeds, tokens, clip_skip=1):
        count, length = embeds.shape[:2]
        hidden = embeds.to(torch.float32) + params["pos"][:length]
        mask = torch.full((length, length), torch.finfo(torch.float32).min, device=hidden.device).triu_(1)
        mask = mask[None, None].expand(count, 1, length, length)
        out = functional_call(self.inner.encoder, _sub(params, "enc."), (),
                              {"inputs_embeds": hidden, "causal_attention_mask": mask,
                               "output_hidden_states": True, "return_dict": True})
        norm = _sub(params, "ln.")
        states = out.hidden_states
        last = functional_call(self.inner.final_layer_norm, norm, (states[-1],))
        index = hidden_state_index(self.family, clip_skip, len(states) - 1)
        cond = last if index is None else functional_call(self.inner.final_layer_norm, norm, (states[index],))
        pooled = last[torch.arange(count, device=last.device), _end_positions(tokens).to(last.device)]
        return cond, pooled @ self.projection.to(pooled.device)


class OpenClipTextTower(TextTower):
    """ldm's SD2 text tower (``FrozenOpenCLIPEmbedder.model``): its own projection, penultimate layer."""

    def __init__(self, model: nn.Module, *, embed_fn: Callable | None = None, start: int = 49406,
                 end: int = 49407, pad: int = 0):
        self.model = model
        super().__init__("sd2", embed_fn or model.token_embedding, _innermost(model.token_embedding),
                         model.text_projection, start, end, pad)

    def weights(self) -> Params:
        params = {"pos": self.model.positional_embedding.detach().to(torch.float32).clone()}
        for i, block in enumerate(self.model.transformer.resblocks):
            params.update(_copies(f"blk.{i}.", block))
        params.update(_copies("ln.", self.model.ln_final))
        return params

    def run(self, params, embeds, tokens, clip_skip=1):
        model = self.model
        blocks = list(model.transformer.resblocks)
        hidden_state_index("sd2", clip_skip, len(blocks))  # validates clip_skip
        x = embeds.to(torch.float32) + params["pos"][:embeds.shape[1]]
        mask = model.attn_mask.to(x.device, torch.float32) if model.attn_mask is not None else None
        batch_first = getattr(model.transformer, "batch_first", False)
        if not batch_first:
            x = x.permute(1, 0, 2)
        stop, middle = len(blocks) - clip_skip, None
        for i, block in enumerate(blocks):
            if i == stop:
                middle = x
            x = functional_call(block, _sub(params, f"blk.{i}."), (x,), {"attn_mask": mask})
        if not batch_first:
            x, middle = x.permute(1, 0, 2), middle.permute(1, 0, 2)
        norm = _sub(params, "ln.")
        last = functional_call(model.ln_final, norm, (x,))
        cond = functional_call(model.ln_final, norm, (middle,))
        pooled = last[torch.arange(x.shape[0], device=x.device), _end_positions(tokens).to(x.device)]
        return cond, pooled @ self.projection.to(pooled.device)


def _innermost(module: nn.Module) -> nn.Module:
    """The ``nn.Embedding`` under any ``.wrapped`` layers (the host's and ours)."""
    for _ in range(8):
        if isinstance(module, nn.Embedding) or not hasattr(module, "wrapped"):
            break
        module = module.wrapped
    return module
