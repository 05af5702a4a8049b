"""Noise-schedule helpers: the discrete training schedule seen as continuous noise levels.

A model trained on ``alphas_cumprod`` (1000 entries) is sampled in "sigma space" (Karras et al. 2022):
the latent at timestep t is ``x0 + sigma(t) * noise`` with ``sigma(t) = sqrt((1 - a_t) / a_t)``.
Between integer timesteps we interpolate log-sigma linearly, as k-diffusion's ``CompVisDenoiser`` (and
so the WebUI) does, which is why a sampler may ask the model for a fractional timestep.
"""
from __future__ import annotations

import torch


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Noise level of every training timestep, increasing with t (float32, same device)."""
    alphas_cumprod = alphas_cumprod.float()
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Sigma at (fractional) timesteps `t`, interpolating log-sigma between neighbouring integers."""
    t = t.float()
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`t_to_sigma`: the fractional timestep whose interpolated sigma is `sigma`.

    Sigmas outside the schedule clamp to timestep 0 or the last one.
    """
    log_sigma = sigma.float().log()
    above = (log_sigma[None] - log_sigmas.reshape(-1, *[1] * log_sigma.dim())) >= 0
    low = above.cumsum(0).argmax(0).clamp(max=len(log_sigmas) - 2)
    w = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return (1 - w) * low + w * (low + 1)


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """Samplers end at sigma 0: the clean latent."""
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def linspace_sigmas(alphas_cumprod: torch.Tensor, steps: int) -> torch.Tensor:
    """`steps` + 1 sigmas at timesteps evenly spaced from the last one down to 0, then 0.

    This is the WebUI's "Automatic" schedule for Euler / Euler a (k-diffusion ``get_sigmas``).
    """
    log_sigmas = sigmas_from_alphas_cumprod(alphas_cumprod).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, steps, device=log_sigmas.device)
    return append_zero(t_to_sigma(t, log_sigmas))


def ddim_timesteps(num_train_timesteps: int, steps: int, offset: int = 1) -> torch.Tensor:
    """DDIM's "uniform"/"leading" integer timesteps, high to low (SD's scheduler uses offset 1)."""
    if not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"DDIM needs 1..{num_train_timesteps} steps, got {steps}")
    ratio = num_train_timesteps // steps
    return (torch.arange(steps - 1, -1, -1) * ratio + offset).clamp(max=num_train_timesteps - 1)


def ddim_sigmas(alphas_cumprod: torch.Tensor, steps: int, offset: int = 1) -> torch.Tensor:
    """Sigmas at the DDIM timesteps, then 0 (the last step lands on the clean latent)."""
    sigmas = sigmas_from_alphas_cumprod(alphas_cumprod)
    return append_zero(sigmas[ddim_timesteps(len(sigmas), steps, offset).to(sigmas.device)])
