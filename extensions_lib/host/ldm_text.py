"""Token chunks -> conditioning through the text encoders ldm builds, as the WebUI's wrappers run them.

Both functions call the encoder's own submodules as modules (never reading a weight directly), so the
host's ``--medvram`` forward-pre-hooks fire before anything touches the weights, and the token ids are
moved to the compute device first (the mistake behind WebUI issue #2399 was the other way round).
"""
from __future__ import annotations

import torch

from ..backend.text_encoding import hidden_state_index


def encode_clip_chunks(frozen_clip, tokens: torch.Tensor, clip_skip: int, device: torch.device) -> torch.Tensor:
    """SD1: ldm ``FrozenCLIPEmbedder`` (``.transformer`` is a transformers ``CLIPTextModel``).

    Same layer choice as the WebUI's ``encode_with_transformers`` with Clip skip = `clip_skip`.
    """
    transformer = frozen_clip.transformer
    index = hidden_state_index("sd1", clip_skip, transformer.config.num_hidden_layers)
    out = transformer(input_ids=tokens.to(device), output_hidden_states=index is not None)
    if index is None:
        return out.last_hidden_state
    return transformer.text_model.final_layer_norm(out.hidden_states[index])


def encode_open_clip_chunks(frozen_open_clip, tokens: torch.Tensor, clip_skip: int,
                            device: torch.device) -> torch.Tensor:
    """SD2: ldm ``FrozenOpenCLIPEmbedder`` (``.model`` is the OpenCLIP text tower), its ``encode_with_transformer``.

    clip_skip 1 stops before the last block (ldm's "penultimate"); each step further stops one block
    earlier. ``ln_final`` is applied in every case, as ldm does.
    """
    model = frozen_open_clip.model
    blocks = model.transformer.resblocks
    hidden_state_index("sd2", clip_skip, len(blocks))  # validates clip_skip
    x = model.token_embedding(tokens.to(device))  # first call: lets the host's placement hook run
    x = x + model.positional_embedding.to(x.dtype)
    batch_first = getattr(model.transformer, "batch_first", False)  # newer open_clip keeps NLD
    if not batch_first:
        x = x.permute(1, 0, 2)
    for block in list(blocks)[:len(blocks) - clip_skip]:
        x = block(x, attn_mask=model.attn_mask)
    if not batch_first:
        x = x.permute(1, 0, 2)
    return model.ln_final(x)
