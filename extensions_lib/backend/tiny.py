"""Tiny LDM-layout checkpoints for tests and the demo: the real key structure at toy sizes.

A tiny checkpoint has every key a real SD1/SD2 single file has (UNet, VAE, text encoder, noise schedule;
SD2's ``text_projection``/``logit_scale``; SD1's ``position_ids``), with 2 UNet levels of 32/64 channels, a
4-level 32-channel VAE (so latents are 1/8 of the image size, as for real models), and a 2-layer text
encoder of width 32 that keeps the real 49408-token vocabulary, so the real tokenizers work.

Weights are random and never zero: a zero-initialised output layer (as ldm's ``zero_module`` makes)
would train nothing, and identical norm weights would hide a swapped key.
"""
from __future__ import annotations

import math
import os
from dataclasses import replace
from pathlib import Path

import torch

from ..atomic import atomic_path
from ..errors import AlchemyError
from . import keymap
from .configs import ModelConfig, alphas_cumprod_from_schedule, build_modules, load_config

TINY_PREFIX = "tiny-"

# The bias that makes the tiny v model answer the WebUI's v-prediction probe as a real v model does
# (see checkpoint.probe_is_v): at t=999 a v model predicts about -x0, far below its input.
_TINY_V_OUTPUT_BIAS = -2.0


def tiny_config(full: ModelConfig) -> ModelConfig:
    """The tiny variant of a full config: same block types and layout rules, toy widths."""
    text_width = 32
    unet = dict(full.unet, block_out_channels=[32, 64], layers_per_block=2, sample_size=8,
                down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=text_width,
                attention_head_dim=[2, 4] if isinstance(full.unet["attention_head_dim"], list) else 2)
    vae = dict(full.vae, block_out_channels=[32, 32, 32, 32], layers_per_block=1, sample_size=64)
    text = dict(full.text_encoder, hidden_size=text_width, intermediate_size=64, num_attention_heads=2,
                num_hidden_layers=2, projection_dim=text_width)
    return replace(full, name=TINY_PREFIX + full.name, unet=unet, vae=vae, text_encoder=text)


def _is_zero_init(component: str, key: str) -> bool:
    """Layers ldm initialises to exactly zero (its ``zero_module``)."""
    if component != "unet":
        return False
    return key.startswith("conv_out.") or ".conv2." in key or ".proj_out." in key


def _random_weights(module: torch.nn.Module, component: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    out = {}
    for key, param in module.state_dict().items():
        if not param.is_floating_point():
            continue
        if param.ndim >= 2:
            std = 1.0 / math.sqrt(param[0].numel())
            value = torch.randn(param.shape, generator=generator) * std
        elif key.endswith("weight"):          # norm scales: around 1, but all different
            value = 1.0 + 0.1 * torch.randn(param.shape, generator=generator)
        else:
            value = 0.1 * torch.randn(param.shape, generator=generator)
        if _is_zero_init(component, key):
            value = value * 0.1
        out[key] = value.contiguous()
    return out


def tiny_state_dicts(family: str, seed: int = 0, *, tiny: bool = True) -> tuple[ModelConfig, dict[str, dict[str, torch.Tensor]]]:
    """Random diffusers-layout weights of the tiny `family` model (or, not `tiny`, the full-size one) plus
    its LDM extras."""
    config = tiny_config(load_config(family)) if tiny else load_config(family)
    generator = torch.Generator().manual_seed(seed)
    modules = build_modules(config)
    parts = {name: _random_weights(m, name, generator) for name, m in modules.items()}
    # Recomputed by the model; real SD1 files carry it as a buffer, SD2's OpenCLIP has no such key.
    parts["text_encoder"].pop("text_model.embeddings.position_ids", None)
    if config.prediction_type == "v":
        parts["unet"]["conv_out.bias"] = parts["unet"]["conv_out.bias"] * 0.1 + _TINY_V_OUTPUT_BIAS

    alphas_cumprod = alphas_cumprod_from_schedule(config.scheduler)
    extra = {"alphas_cumprod": alphas_cumprod.float(),
             "alphas_cumprod_prev": torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]]).float(),
             "betas": (1 - alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])).float()}
    width = config.text_encoder["hidden_size"]
    if config.text_encoder_kind == "clip":
        extra[keymap.CLIP_PREFIX + "text_model.embeddings.position_ids"] = \
            torch.arange(config.text_encoder["max_position_embeddings"]).unsqueeze(0)
    else:
        extra[keymap.OPEN_CLIP_PREFIX + "text_projection"] = torch.randn(width, width, generator=generator) / width ** 0.5
        extra[keymap.OPEN_CLIP_PREFIX + "logit_scale"] = torch.tensor(math.log(1 / 0.07))
    parts[keymap.EXTRA] = extra
    return config, parts


def make_tiny_checkpoint(path: str | os.PathLike, family: str = "sd1", seed: int = 0, *, tiny: bool = True,
                         dtype: torch.dtype = torch.float32) -> Path:
    """Write a tiny LDM-layout checkpoint; ``.safetensors`` or ``.ckpt``/``.pt`` (``{"state_dict": ...}``).
    tiny=False writes the full-size architecture with random weights (benchmarks), in `dtype`."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".safetensors", ".ckpt", ".pt"):
        raise AlchemyError(f"unsupported output type {suffix!r}", path, "name the file .safetensors or .ckpt")
    config, parts = tiny_state_dicts(family, seed, tiny=tiny)
    state_dict = keymap.convert_diffusers_state_dicts(parts, keymap.Layout.from_config(config))
    schedule = set(parts[keymap.EXTRA]) & {"alphas_cumprod", "alphas_cumprod_prev", "betas"}  # kept float32
    state_dict = {k: (v.to(dtype) if v.is_floating_point() and k not in schedule else v).contiguous()
                  for k, v in state_dict.items()}
    with atomic_path(path) as tmp:
        if suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(state_dict, str(tmp), metadata={"format": "pt"})
        else:
            torch.save({"state_dict": state_dict, "global_step": 0}, tmp)
    return path
