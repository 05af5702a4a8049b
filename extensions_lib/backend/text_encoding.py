"""Token chunks -> text conditioning, the way the WebUI picks the CLIP layer for each model family.

- SD1 (ldm ``FrozenCLIPEmbedder`` + the WebUI's Clip skip): ``last_hidden_state``; with clip_skip N > 1,
  ``hidden_states[-N]`` followed by ``final_layer_norm``.
- SD2 (ldm ``FrozenOpenCLIPEmbedder``, ``layer="penultimate"``): the penultimate layer followed by the
  final layer norm (``ln_final``); clip_skip N > 1 goes N - 1 layers further back. (The WebUI itself
  ignores Clip skip for SD2, so clip_skip=1 reproduces it exactly.)

The OpenCLIP text tower runs with a causal ``attn_mask``; transformers' ``CLIPTextModel`` applies the
same causal mask, and neither masks padding, so an SD2 tower converted to ``CLIPTextModel`` layout gives
the same numbers.
"""
from __future__ import annotations

import torch

from ..errors import AlchemyError

FAMILIES = ("sd1", "sd2")


def hidden_state_index(family: str, clip_skip: int, num_layers: int) -> int | None:
    """Index into ``hidden_states`` (embeddings first) of the layer to use; None = ``last_hidden_state``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown text-encoder family {family!r}; expected one of {FAMILIES}")
    if not isinstance(clip_skip, int) or clip_skip < 1:
        raise AlchemyError(f"clip_skip must be a whole number of at least 1, got {clip_skip!r}",
                           fix="use 1 for the last layer, 2 to skip one layer, ...")
    from_end = clip_skip + (1 if family == "sd2" else 0)
    if from_end > num_layers:
        raise AlchemyError(f"clip_skip={clip_skip} goes past the first of the text encoder's {num_layers} layers",
                           fix=f"use a clip_skip of at most {num_layers - (from_end - clip_skip)}")
    return None if from_end == 1 else -from_end


def encode_chunks(text_model, tokens: torch.Tensor, family: str, clip_skip: int = 1) -> torch.Tensor:
    """Encode (N, 77) token chunks with a transformers ``CLIPTextModel`` into (N, 77, C) conditioning.

    The token ids go through ``text_model.text_model.embeddings.token_embedding`` as a module call, so
    a wrapper installed there (textual inversion) takes effect. No attention mask is passed: like the
    WebUI, padding tokens are attended to under the causal mask.
    """
    index = hidden_state_index(family, clip_skip, text_model.config.num_hidden_layers)
    device = text_model.text_model.embeddings.position_embedding.weight.device
    # Running the skipped top layers wastes a little compute, but avoids re-implementing the encoder
    # loop against transformers internals (the causal-mask helpers change between versions).
    out = text_model(input_ids=tokens.to(device), output_hidden_states=index is not None)
    if index is None:
        return out.last_hidden_state
    return text_model.text_model.final_layer_norm(out.hidden_states[index])
