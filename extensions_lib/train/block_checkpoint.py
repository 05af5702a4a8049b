"""Gradient checkpointing of chosen blocks of any model, by instance patch, undone exactly.

Each block gets an instance attribute ``forward`` that runs the class's forward through
:func:`torch.utils.checkpoint.checkpoint` (non-reentrant, so keyword arguments and inputs that need no
gradient work) while gradients are on: the block keeps only its inputs and recomputes its activations in
the backward pass. Without gradients (previews, evaluation) it is the plain forward. Undo deletes the
attribute, so the module is exactly as before. A block that already has an instance ``forward`` (someone
else's patch, e.g. a host's own hijack) is left alone.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(block: nn.Module):
    original = type(block).forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():
            return original(block, *args, **kwargs)
        return checkpoint(original, block, *args, use_reentrant=False, **kwargs)

    return forward


def checkpoint_blocks(blocks: Iterable[nn.Module]) -> tuple[list[nn.Module], Callable[[], None]]:
    """Checkpoint each of `blocks`; returns the blocks patched and the undo."""
    patched = []
    for block in blocks:
        if "forward" in vars(block):
            continue
        block.forward = _checkpointed(block)
        patched.append(block)

    def undo() -> None:
        for block in patched:
            vars(block).pop("forward", None)

    return patched, undo
