"""Turn a :class:`~extensions_lib.adapter.ModelAdapter` into ``model_fn(x, sigma) -> denoised``.

The UNet was trained on variance-preserving latents at integer timesteps; samplers work in sigma space
(``x = x0 + sigma * noise``). :class:`Denoiser` converts between the two: it scales the input by
``c_in = 1 / sqrt(sigma**2 + 1)``, asks the UNet at the (fractional) timestep of `sigma`, and turns its
eps or v prediction into the clean latent. :func:`guided` adds classifier-free guidance on top.
"""
from __future__ import annotations

import torch

from ..adapter import ModelAdapter
from .schedule import sigma_to_t, sigmas_from_alphas_cumprod


def _per_sample(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return values.reshape(-1, *[1] * (x.dim() - 1))


def scalings(sigma: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(c_skip, c_out, c_in) with ``denoised = c_skip * x + c_out * model(c_in * x)``.

    eps: x0 = x - sigma * eps. v (Salimans & Ho 2022, v = alpha * eps - s * x0 on the VP latent):
    x0 = x / (sigma**2 + 1) - sigma / sqrt(sigma**2 + 1) * v.
    """
    c_in = 1 / (sigma**2 + 1) ** 0.5
    if prediction_type == "eps":
        return torch.ones_like(sigma), -sigma, c_in
    if prediction_type == "v":
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in
    raise ValueError(f"unknown prediction type {prediction_type!r} (expected 'eps' or 'v')")


class Denoiser:
    """``denoiser(x, sigma, cond) -> denoised`` for one adapter; sigma is (B,) or a scalar tensor."""

    def __init__(self, adapter: ModelAdapter):
        self.adapter = adapter
        self.log_sigmas = sigmas_from_alphas_cumprod(adapter.alphas_cumprod).log().to(adapter.device)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_t(sigma.to(self.log_sigmas.device), self.log_sigmas)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(x.device, torch.float32).expand(x.shape[0])
        c_skip, c_out, c_in = (_per_sample(c, x) for c in scalings(sigma, self.adapter.prediction_type))
        dtype = self.adapter.dtype
        out = self.adapter.predict((x * c_in).to(dtype), self.sigma_to_t(sigma), cond.to(dtype))
        return c_skip * x + c_out * out.float()


def guided(denoiser: Denoiser, cond: torch.Tensor, uncond: torch.Tensor, cfg_scale: float):
    """Classifier-free guidance: ``uncond + (cond - uncond) * cfg_scale`` on the denoised latents.

    cond/uncond are (B, T, C) for the B latents being sampled. Both halves run as one UNet batch when
    their token lengths agree (the WebUI's default); otherwise, as the WebUI does, in two calls rather
    than padding one of them, which would change the result.
    """
    def model_fn(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        if cfg_scale == 1:
            return denoiser(x, sigma, cond)
        if cond.shape[1:] == uncond.shape[1:]:
            sigma2 = sigma.expand(x.shape[0]).repeat(2)
            d_cond, d_uncond = denoiser(torch.cat([x, x]), sigma2, torch.cat([cond, uncond])).chunk(2)
        else:
            d_cond, d_uncond = denoiser(x, sigma, cond), denoiser(x, sigma, uncond)
        return d_uncond + (d_cond - d_uncond) * cfg_scale

    return model_fn
