"""Inpaint text with a Stable Diffusion model (the WebUI's loaded one, or a checkpoint) instead of OpenCV.

The WebUI's "inpaint only masked" done with our sampler: the mask's bounding box plus `padding` is cut
out, scaled so its long side is `resolution` (multiples of 8), VAE-encoded, noised to the strength's
starting sigma and denoised with Euler under the prompt; at every step the prediction outside the
(latent-sized) mask is replaced by the original latents, so only the masked area is regenerated. The
result is scaled back and only the masked pixels are pasted into the image. Works with any SD1/SD2
checkpoint (an inpainting checkpoint's extra UNet inputs are not used).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from ..sampling.denoiser import Denoiser, guided
from ..sampling.samplers import find_sampler
from ..sampling.txt2img import LATENT_DOWNSCALE, ImageNoise, encode_pair, to_pil


@dataclass(frozen=True)
class SdInpaintSettings:
    prompt: str = "plain background"
    negative: str = "text, letters, watermark, signature"
    steps: int = 20
    strength: float = 0.75
    cfg_scale: float = 7.0
    seed: int = 1
    padding: int = 32
    resolution: int = 512


def region(mask: np.ndarray, padding: int) -> tuple[int, int, int, int] | None:
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    h, w = mask.shape
    return (max(0, int(xs.min()) - padding), max(0, int(ys.min()) - padding),
            min(w, int(xs.max()) + 1 + padding), min(h, int(ys.max()) + 1 + padding))


def work_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    scale = resolution / max(width, height)
    snap = lambda v: max(LATENT_DOWNSCALE, int(round(v * scale / LATENT_DOWNSCALE)) * LATENT_DOWNSCALE)  # noqa: E731
    return snap(width), snap(height)


class SdInpainter:
    """``inpainter(image, mask) -> image`` over a :class:`~extensions_lib.adapter.ModelAdapter`."""

    def __init__(self, adapter, settings: SdInpaintSettings = SdInpaintSettings()):
        self.adapter, self.settings = adapter, settings
        with torch.no_grad():
            self._cond = encode_pair(adapter, settings.prompt, settings.negative, clip_skip=1)

    @torch.no_grad()
    def __call__(self, image: Image.Image, mask: np.ndarray) -> Image.Image:
        s, adapter = self.settings, self.adapter
        box = region(mask, s.padding)
        rgb = image.convert("RGB")
        if box is None:
            return image
        crop = rgb.crop(box)
        size = work_size(crop.width, crop.height, s.resolution)
        pixels = torch.from_numpy(np.asarray(crop.resize(size, Image.LANCZOS), dtype=np.float32) / 127.5 - 1)
        vae = adapter.modules().get("vae")
        dtype = next(vae.parameters()).dtype if vae is not None else adapter.dtype
        with adapter.use("vae"):
            init = adapter.encode_images(pixels.permute(2, 0, 1)[None].to(adapter.device, dtype)).mode().float()
        m = torch.from_numpy((np.asarray(Image.fromarray(mask[box[1]:box[3], box[0]:box[2]]).resize(
            (init.shape[-1], init.shape[-2]), Image.BOX), dtype=np.float32) / 255.0 > 0.0).astype(np.float32))
        m = m.to(adapter.device)[None, None]
        spec = find_sampler("euler")
        sigmas = spec.schedule(adapter.alphas_cumprod.float().to(adapter.device), s.steps)
        sigmas = sigmas[min(s.steps - 1, int(s.steps * (1 - s.strength))):]
        noise = ImageNoise([s.seed], init.shape[1:], adapter.device)
        x = init + noise() * sigmas[0]
        cond, uncond = self._cond
        model_fn = guided(Denoiser(adapter), cond, uncond, s.cfg_scale)

        def masked_fn(x_in, sigma):
            return m * model_fn(x_in, sigma) + (1 - m) * init

        with adapter.use("unet"):
            latents = spec.sample(masked_fn, x, sigmas)
        with adapter.use("vae"):
            out = to_pil(adapter.decode_latents(latents.to(dtype))[0]).resize(crop.size, Image.LANCZOS)
        result = np.asarray(rgb).copy()
        keep = mask[box[1]:box[3], box[0]:box[2]] > 0
        result[box[1]:box[3], box[0]:box[2]][keep] = np.asarray(out)[keep]
        merged = Image.fromarray(result)
        if image.mode == "RGBA":
            merged.putalpha(image.getchannel("A"))
        return merged
