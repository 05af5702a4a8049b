"""The VAE decoder checkpointed for backpropagation (APT's reconstruction loss), undone on exit.

Decoding a 512² image keeps hundreds of MB of activations for backward. With checkpointing each of the
decoder's innermost blocks (the elements of its innermost ``nn.ModuleList`` s: diffusers' resnets,
attentions and upsamplers, ldm's ``up[i].block[j]`` / ``attn[j]``) keeps only its input and recomputes
itself in the backward pass, so at most one block's activations are alive at a time. The same rule fits
both backends' decoders without knowing their classes. (The run set-up freezes the VAE's weights, as every
model weight: only the embeddings collect gradients.)

The blocks are patched by :func:`~extensions_lib.train.block_checkpoint.checkpoint_blocks`; exit undoes it, so
the module is exactly as before.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn

from ..train.block_checkpoint import checkpoint_blocks


def innermost_blocks(decoder: nn.Module) -> list[nn.Module]:
    """Elements of `decoder`'s ModuleLists that contain no ModuleList themselves."""
    blocks = []
    for module in decoder.modules():
        if isinstance(module, nn.ModuleList):
            for child in module:
                if not any(isinstance(m, nn.ModuleList) for m in child.modules()):
                    blocks.append(child)
    return blocks


@contextlib.contextmanager
def checkpointed_decoder(vae: nn.Module) -> Iterator[list[nn.Module]]:
    """Inside: the innermost blocks of ``vae.decoder`` checkpointed; yields them."""
    decoder = getattr(vae, "decoder", None)
    patched, undo = checkpoint_blocks(innermost_blocks(decoder) if decoder is not None else [])
    try:
        yield patched
    finally:
        undo()
