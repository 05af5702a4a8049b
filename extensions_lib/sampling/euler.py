"""Euler samplers for the probability-flow ODE (and its ancestral SDE variant), k-diffusion style.

``model_fn(x, sigma) -> denoised`` is the only thing a sampler knows about the model; ``x`` lives in
sigma space (``x0 + sigma * noise``), so a step is plain arithmetic on the predicted clean latent.
"""
from __future__ import annotations

from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def _report(callback, x, i, sigma, denoised) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})


@torch.no_grad()
def sample_euler(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, callback=None) -> torch.Tensor:
    """Euler's method from sigmas[0] to sigmas[-1] (Karras et al. 2022, Algorithm 2 without churn)."""
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        denoised = model_fn(x, sigmas[i] * s_in)
        _report(callback, x, i, sigmas[i], denoised)
        d = (x - denoised) / sigmas[i]
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0):
    """Split a step to `sigma_to` into a deterministic part down to `sigma_down` and fresh noise `sigma_up`.

    sigma_down**2 + sigma_up**2 == sigma_to**2, so the marginal noise level is right after adding noise.
    """
    if not eta:
        return sigma_to, sigma_to * 0
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    return (sigma_to**2 - sigma_up**2) ** 0.5, sigma_up


@torch.no_grad()
def sample_euler_ancestral(model_fn: ModelFn, x: torch.Tensor, sigmas: torch.Tensor, callback=None,
                           eta: float = 1.0, noise_fn: NoiseFn = torch.randn_like) -> torch.Tensor:
    """Euler steps that overshoot to `sigma_down` and add back `sigma_up` of fresh noise ("Euler a")."""
    s_in = x.new_ones(x.shape[0])
    for i in range(len(sigmas) - 1):
        denoised = model_fn(x, sigmas[i] * s_in)
        _report(callback, x, i, sigmas[i], denoised)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + (x - denoised) / sigmas[i] * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise_fn(x) * sigma_up
    return x
