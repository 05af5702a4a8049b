"""Memory savers for DreamBooth: gradient checkpointing of the UNet's blocks, 8-bit AdamW when available,
the fused backward+step (:mod:`..train.fused_step`), the parts not read during the steps moved away."""
from __future__ import annotations

import importlib
import random
from typing import Callable

import torch
from torch import nn

from ..errors import AlchemyError
from ..train.block_checkpoint import checkpoint_blocks
from ..train.dataset import create_text
from ..train.fused_step import FusedStep, refusal
from ..train.offload import Offload, OffloadSet
from ..train.setup import all_real


HOST_BLOCKS = ("ResBlock", "BasicTransformerBlock", "ResnetBlock2D")
"""Blocks checkpointed in a UNet without diffusers' switch (the WebUI's ldm model): ldm's ``ResBlock`` and
``BasicTransformerBlock`` are what the WebUI's own training checkpoints (``sd_hijack_checkpoint``);
diffusers' names cover a host built on diffusers modules."""


def checkpointing(unet: nn.Module) -> Callable[[], None]:
    """Turn on gradient checkpointing in the UNet's blocks; the undo.

    A diffusers UNet has its own switch. diffusers checkpoints a block only while it is in training mode, and
    the run set-up puts every module in eval mode, so the blocks that checkpoint are put in training mode
    (SD's UNet has no dropout, so nothing else changes; the run set-up restores the modes afterwards). Any
    other UNet (the WebUI's ldm model) gets its residual and transformer blocks checkpointed by instance
    patch (:mod:`..train.block_checkpoint`)."""
    if hasattr(unet, "enable_gradient_checkpointing"):
        unet.enable_gradient_checkpointing()
        for module in unet.modules():
            if hasattr(module, "gradient_checkpointing"):
                module.train()
        return unet.disable_gradient_checkpointing
    blocks = [m for m in unet.modules() if type(m).__name__ in HOST_BLOCKS]
    if not blocks:
        raise AlchemyError("gradient checkpointing: the loaded UNet has no blocks this extension knows how to "
                           "checkpoint", fix="turn gradient checkpointing off")
    return checkpoint_blocks(blocks)[1]


def adamw_class(want_8bit: bool, device: torch.device, import_module=importlib.import_module) -> type:
    """bitsandbytes' AdamW8bit when asked, on CUDA, and importable; torch's AdamW otherwise (never an error)."""
    if want_8bit and torch.device(device).type == "cuda":
        try:
            return import_module("bitsandbytes").optim.AdamW8bit
        except (ImportError, AttributeError, RuntimeError):
            pass
    return torch.optim.AdamW


def check_fused(options, device: torch.device) -> None:
    """A clear error when the run's options need every gradient at once (accumulation, clipping, fp16 loss
    scaling), which the fused backward+step cannot give."""
    from ..train.loop import _precision

    problem = refusal(gradient_step=options.gradient_step, clip_grad_mode=options.clip_grad_mode,
                      fp16_scaling=_precision(options.mixed_precision, torch.device(device)) == torch.float16)
    if problem is not None:
        raise problem


def fused_optimizer(groups: list[dict], make_optimizer: Callable[[list[dict]], torch.optim.Optimizer], options,
                    device: torch.device) -> FusedStep:
    """A :class:`~extensions_lib.train.fused_step.FusedStep` over `groups` (see :func:`check_fused`)."""
    check_fused(options, device)
    return FusedStep(groups, make_optimizer)


def fixed_prompts(data, options) -> list[str] | None:
    """Every prompt a run over `data` can draw, or None when tags are shuffled or dropped (then they vary)."""
    if options.shuffle_tags or options.tag_drop_out > 0:
        return None
    prompts = []
    for concept in data.concepts:
        prompts += [create_text(concept.concept.instance_prompt, entry.caption, "", random.Random(0))
                    for entry in concept.instances.entries]
        if concept.class_latents is not None:
            prompts.append(concept.concept.class_prompt)
    return list(dict.fromkeys(prompts))


def parts_away(adapter, options, data, encode: Callable[[list[str]], torch.Tensor]) -> OffloadSet | None:
    """The parts a run does not read during its steps, to move out of memory: the VAE (latents are cached)
    and, when it is frozen and the prompts are fixed, the text encoder (after `encode` has cached every
    prompt's encoding). None when there is nothing to move."""
    modules = adapter.modules()
    names = ["vae"]
    prompts = None if options.train_text_encoder else fixed_prompts(data, options)
    if prompts is not None:
        encode(prompts)
        names.append("text_encoder")
    offloads = [Offload(modules[n]) for n in names if modules.get(n) is not None and all_real(modules[n])]
    return OffloadSet(offloads) if offloads else None
