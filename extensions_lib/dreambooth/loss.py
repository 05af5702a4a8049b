"""The DreamBooth objective: instance loss plus the prior-preservation loss, weighted.

``loss = mean(instance samples) + λ · mean(class samples)`` (the paper's and diffusers' form). The
d8ahazard extension computes the prior term for SD1/SD2 but optimises only the instance term; here λ is
applied, and a test checks the sum against an independent computation.
"""
from __future__ import annotations

import torch

from ..train.diffusion_loss import denoising_losses


def split_loss(losses: torch.Tensor, prior: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(instance mean, prior mean or None) of per-sample `losses` whose last `prior` are class samples."""
    n = losses.shape[0] - prior
    if n <= 0:
        raise ValueError("a DreamBooth batch needs at least one instance sample")
    return losses[:n].mean(), (losses[n:].mean() if prior else None)


def dreambooth_loss(adapter, latents: torch.Tensor, cond: torch.Tensor, prior: int, prior_weight: float,
                    **noise_options) -> tuple[torch.Tensor, float, float | None]:
    """(loss to optimise, instance loss, prior loss) of one batch; `noise_options` go to
    :func:`~extensions_lib.train.diffusion_loss.denoising_losses` (generator, min_snr_gamma, noise_offset)."""
    instance, prior_loss = split_loss(denoising_losses(adapter, latents, cond, **noise_options), prior)
    total = instance if prior_loss is None else instance + prior_weight * prior_loss
    return total, float(instance.detach()), None if prior_loss is None else float(prior_loss.detach())
