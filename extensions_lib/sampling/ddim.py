"""DDIM (Song et al. 2020, eq. 12) driven through the same ``model_fn(x, sigma) -> denoised`` interface.

The update is written in DDIM's own terms, alpha_t = 1 / (1 + sigma**2), on the variance-preserving
latent ``x * sqrt(alpha)``, then mapped back to sigma space. With eta = 0 it is the same ODE step as
Euler; eta = 1 adds DDPM-like fresh noise.
"""
from __future__ import annotations

import torch

from .euler import ModelFn, NoiseFn, _report


@torch.no_grad()
def sample_ddim(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, callback=None,
                eta: float = 0.0, noise_fn: NoiseFn = torch.randn_like) -> torch.Tensor:
    """DDIM from sigmas[0] to sigmas[-1]; use :func:`schedule.ddim_sigmas` for DDIM's own timesteps."""
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        denoised = model_fn(x, sigmas[i] * s_in)
        _report(callback, x, i, sigmas[i], denoised)
        eps = (x - denoised) / sigma
        a_t, a_prev = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
        std = eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5
        x_vp = a_prev**0.5 * denoised + max(1 - a_prev - std**2, 0.0) ** 0.5 * eps
        if std > 0:
            x_vp = x_vp + std * noise_fn(x)
        x = x_vp / a_prev**0.5
    return x
