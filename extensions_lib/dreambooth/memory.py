"""Memory savers for DreamBooth: gradient checkpointing of the UNet's blocks, 8-bit AdamW when available."""
from __future__ import annotations

import importlib
from typing import Callable

import torch
from torch import nn


def checkpointing(unet: nn.Module) -> Callable[[], None]:
    """Turn on diffusers' gradient checkpointing in the UNet's blocks; the undo.

    diffusers checkpoints a block only while it is in training mode, and the run set-up puts every module in
    eval mode, so the blocks that checkpoint are put in training mode (SD's UNet has no dropout, so nothing
    else changes; the run set-up restores the modes afterwards)."""
    unet.enable_gradient_checkpointing()
    for module in unet.modules():
        if hasattr(module, "gradient_checkpointing"):
            module.train()
    return unet.disable_gradient_checkpointing


def adamw_class(want_8bit: bool, device: torch.device, import_module=importlib.import_module) -> type:
    """bitsandbytes' AdamW8bit when asked, on CUDA, and importable; torch's AdamW otherwise (never an error)."""
    if want_8bit and torch.device(device).type == "cuda":
        try:
            return import_module("bitsandbytes").optim.AdamW8bit
        except (ImportError, AttributeError, RuntimeError):
            pass
    return torch.optim.AdamW
