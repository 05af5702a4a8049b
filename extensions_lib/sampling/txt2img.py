"""Text-to-image generation: the previews trainers make and the ``alchemy txt2img`` command.

Everything the result depends on goes in as arguments, so a loader (embeddings, hypernetworks) applies
its patch to the adapter, or passes its own ``encode_fn``, before calling :func:`generate`.
Noise follows the WebUI with the "CPU" RNG source: image i of a batch draws from a CPU
``torch.Generator`` seeded ``seed + i``, first its starting noise, then any fresh noise the sampler adds.
"""
from __future__ import annotations

import contextlib
import random
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from PIL import Image

from ..adapter import ModelAdapter
from ..errors import AlchemyError
from ..options import option
from ..train.cpu_memory import reusing_call_buffers
from .denoiser import Denoiser, guided
from .infotext import format_number, infotext
from .samplers import SAMPLERS, SamplerSpec, find_sampler

LATENT_DOWNSCALE = 8
EncodeFn = Callable[..., torch.Tensor]


@dataclass
class GenerationOptions:
    prompt: str = option("", help="what the image should show", widget="textarea")
    negative: str = option("", help="what to steer away from", label="Negative prompt", widget="textarea")
    steps: int = option(20, help="sampling steps", minimum=1, maximum=150, step=1)
    sampler: str = option("euler", help="sampling method", choices=list(SAMPLERS))
    cfg_scale: float = option(7.0, help="how strongly the image follows the prompt (classifier-free guidance)",
                              cli="--cfg", label="CFG scale", minimum=1.0, maximum=30.0, step=0.5)
    seed: int = option(-1, help="noise seed; -1 picks a random one; image i of a batch uses seed + i")
    width: int = option(512, help="image width in pixels, a multiple of 8", minimum=64, maximum=2048, step=8)
    height: int = option(512, help="image height in pixels, a multiple of 8", minimum=64, maximum=2048, step=8)
    batch_size: int = option(1, help="images generated together", minimum=1, maximum=8, step=1)
    clip_skip: int = option(1, help="use the text encoder's N-th layer from the end (1 = last)",
                            minimum=1, maximum=12, step=1)


def generate(adapter: ModelAdapter, prompt: str, negative: str = "", steps: int = 20, cfg_scale: float = 7.0,
             seed: int = -1, width: int = 512, height: int = 512, sampler: str = "euler", batch_size: int = 1,
             clip_skip: int = 1, encode_fn: EncodeFn | None = None, callback: Callable | None = None,
             extra_params: Mapping[str, Any] | None = None) -> list[Image.Image]:
    """Generate `batch_size` images; each carries its WebUI infotext in ``image.info["parameters"]``.

    encode_fn(adapter, prompts, clip_skip=N) -> (len(prompts), 77*k, C) conditioning; default
    ``extensions_lib.prompt.encode_prompts``. callback gets the sampler's per-step dict
    ({"x", "i", "sigma", "sigma_hat", "denoised"}) and may raise ``Cancelled``. extra_params are
    appended to the infotext (e.g. a hypernetwork's name).
    """
    opts = GenerationOptions(prompt=prompt, negative=negative, steps=steps, sampler=sampler, cfg_scale=cfg_scale,
                             seed=seed, width=width, height=height, batch_size=batch_size, clip_skip=clip_skip)
    return generate_from(adapter, opts, encode_fn=encode_fn, callback=callback, extra_params=extra_params)


def generate_from(adapter: ModelAdapter, opts: GenerationOptions, *, encode_fn: EncodeFn | None = None,
                  callback: Callable | None = None, extra_params: Mapping[str, Any] | None = None,
                  refuse_nan: bool = False) -> list[Image.Image]:
    """:func:`generate` for options held as one :class:`GenerationOptions` (CLI, UI, trainer previews).

    refuse_nan: raise :class:`NonFiniteImage` (before any image is returned) when the model produced NaN or
    infinite values, instead of returning the black image they turn into.
    """
    spec = check_options(opts)
    seeds = [fixed_seed(opts.seed) + i for i in range(opts.batch_size)]
    with torch.no_grad():
        cond, uncond = encode_pair(adapter, opts.prompt, opts.negative, opts.clip_skip, encode_fn)
        noise = ImageNoise(seeds, latent_shape(opts.width, opts.height), adapter.device)
        latents = sample_latents(adapter, spec, cond, uncond, noise, opts.steps, opts.cfg_scale, callback)
        images = decode_images(adapter, latents, refuse_nan=refuse_nan)
    for image, seed in zip(images, seeds):
        image.info["parameters"] = infotext(opts.prompt, opts.negative, {
            "Steps": opts.steps, "Sampler": spec.label, "CFG scale": format_number(opts.cfg_scale), "Seed": seed,
            "Size": f"{opts.width}x{opts.height}", "Model hash": adapter.checkpoint_hash or None,
            "Model": adapter.checkpoint_name or None, "Clip skip": opts.clip_skip if opts.clip_skip > 1 else None,
            "RNG": "CPU", **(extra_params or {})})
    return images


def check_options(opts: GenerationOptions) -> SamplerSpec:
    """Reject settings that cannot work, naming the option; returns the sampler."""
    for name in ("width", "height"):
        value = getattr(opts, name)
        if value < LATENT_DOWNSCALE or value % LATENT_DOWNSCALE:
            raise AlchemyError(f"option {name} must be a positive multiple of {LATENT_DOWNSCALE}, got {value}",
                               fix=f"use e.g. {value - value % LATENT_DOWNSCALE or 512}")
    for name in ("steps", "batch_size", "clip_skip"):
        if getattr(opts, name) < 1:
            raise AlchemyError(f"option {name} must be at least 1, got {getattr(opts, name)}")
    return find_sampler(opts.sampler)


def fixed_seed(seed: int | None) -> int:
    """-1 (or None) means "any": pick one the way the WebUI does, so it can be written down."""
    return random.randrange(4294967294) if seed is None or seed == -1 else int(seed)


def latent_shape(width: int, height: int, channels: int = 4) -> tuple[int, int, int]:
    return channels, height // LATENT_DOWNSCALE, width // LATENT_DOWNSCALE


class ImageNoise:
    """Gaussian noise for a batch, one CPU generator per image (the WebUI's ``ImageRNG``, source "CPU").

    Calling it draws the next (B, *shape) block; image i's values depend only on its own seed, so a
    picture is the same whether made alone or in a batch.
    """

    def __init__(self, seeds: Sequence[int], shape: Sequence[int], device: torch.device | str = "cpu"):
        self.generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        self.shape = tuple(shape)
        self.device = device

    def __call__(self, like: torch.Tensor | None = None) -> torch.Tensor:
        noise = torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
        return noise.to(like.device if like is not None else self.device)


def encode_pair(adapter: ModelAdapter, prompt: str, negative: str, clip_skip: int,
                encode_fn: EncodeFn | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond), each (1, 77*k, C), on the adapter's device. Encoded separately, as the WebUI
    does, so their chunk counts may differ."""
    if encode_fn is None:
        from ..prompt import encode_prompts as encode_fn
    text_parts = [name for name in adapter.modules() if name.startswith("text_encoder")]
    with adapter.use(*text_parts):
        cond = encode_fn(adapter, [prompt], clip_skip=clip_skip)
        uncond = encode_fn(adapter, [negative], clip_skip=clip_skip)
    return cond.to(adapter.device), uncond.to(adapter.device)


def sample_latents(adapter: ModelAdapter, spec: SamplerSpec, cond: torch.Tensor, uncond: torch.Tensor,
                   noise: ImageNoise, steps: int, cfg_scale: float, callback: Callable | None = None) -> torch.Tensor:
    """Run `spec`'s sampler from `noise`'s first draw to clean latents, float32 (B, 4, h, w)."""
    sigmas = spec.schedule(adapter.alphas_cumprod.float().to(adapter.device), steps)
    x = noise() * spec.initial_noise_scale(float(sigmas[0]))
    batch = x.shape[0]
    model_fn = guided(Denoiser(adapter), cond.expand(batch, -1, -1), uncond.expand(batch, -1, -1), cfg_scale)
    extra = {"noise_fn": noise} if spec.stochastic else {}
    # On the CPU each UNet call would otherwise page-fault its large buffers in afresh (cpu_memory).
    with adapter.use("unet"), reusing_call_buffers() if x.device.type == "cpu" else contextlib.nullcontext():
        return spec.sample(model_fn, x, sigmas, callback=callback, **extra)


class NonFiniteImage(AlchemyError):
    """The model produced NaN or infinite values: the image would be black."""


def _check_finite(tensor: torch.Tensor, stage: str, index: int) -> None:
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteImage(f"the {stage} produced NaN or infinite values for image {index + 1}, so it would be "
                             "black; no image was written",
                             fix="the checkpoint (or a hypernetwork or embedding applied to it) is broken, or half "
                                 "precision overflowed: try full precision (--device cpu) or another checkpoint/VAE")


def decode_images(adapter: ModelAdapter, latents: torch.Tensor, refuse_nan: bool = False) -> list[Image.Image]:
    """VAE-decode one latent at a time (as the WebUI does: peak memory of a single image); with
    `refuse_nan`, NonFiniteImage when the sampler or the VAE produced NaN/inf."""
    vae = adapter.modules().get("vae")
    dtype = getattr(adapter, "compute_dtype", None) or (next(vae.parameters()).dtype if vae is not None
                                                         else adapter.dtype)
    images = []
    with adapter.use("vae"):
        for index, latent in enumerate(latents):
            if refuse_nan:
                _check_finite(latent, "sampler (UNet)", index)
            decoded = adapter.decode_latents(latent[None].to(adapter.device, dtype))[0]
            if refuse_nan:
                _check_finite(decoded, "VAE", index)
            images.append(to_pil(decoded))
    return images


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [-1, 1] -> RGB image, truncating to uint8 like the WebUI."""
    pixels = ((image.float() + 1) / 2).clamp(0, 1).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray((255.0 * pixels).astype(np.uint8))
