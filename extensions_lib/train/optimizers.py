"""Optimizer choices a method can hand to the loop through ``create_optimizer``."""
from __future__ import annotations

import importlib.util
from typing import Sequence

import torch


def adamw(groups: Sequence[dict], lr: float, *, eight_bit: bool = False) -> tuple[torch.optim.Optimizer, str]:
    """AdamW, or bitsandbytes' 8-bit AdamW when asked for and importable (it keeps the optimizer state in
    8 bits: about 75% less optimizer memory, which matters when UNet weights train).

    Returns (optimizer, note); the note says which one and why, for the method to show once.
    """
    if eight_bit:
        if importlib.util.find_spec("bitsandbytes") is not None:
            try:
                import bitsandbytes as bnb

                return bnb.optim.AdamW8bit(groups, lr=lr), "optimizer: 8-bit AdamW (bitsandbytes)"
            except Exception as exc:  # installed but unusable (no CUDA build, wrong GPU...)
                return torch.optim.AdamW(groups, lr=lr), f"optimizer: AdamW (bitsandbytes failed to load: {exc})"
        return torch.optim.AdamW(groups, lr=lr), ("optimizer: AdamW (8-bit AdamW needs the bitsandbytes package: "
                                                  "pip install bitsandbytes)")
    return torch.optim.AdamW(groups, lr=lr), "optimizer: AdamW"
