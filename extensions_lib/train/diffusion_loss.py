"""Pure tensor helpers for the denoising objective (DDPM forward process, targets, weights).

Timesteps are integer indices into ``alphas_cumprod`` (ᾱ), as in ``extensions_lib.adapter``. Nothing here
knows about a model except :func:`denoising_loss`, which only calls ``adapter.predict``.
"""
from __future__ import annotations

import torch


def _gather(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """ᾱ_t per sample, shaped (B, 1, 1, ...) to broadcast over `like`, in float32 on `like`'s device."""
    a = alphas_cumprod.to(torch.float32)[timesteps.long().cpu()].to(like.device)
    return a.reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
              alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0): ``√ᾱ_t · x0 + √(1−ᾱ_t) · noise``."""
    a = _gather(alphas_cumprod, timesteps, x0)
    return (a.sqrt() * x0.float() + (1 - a).sqrt() * noise.float()).to(x0.dtype)


def velocity(x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
             alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """v-prediction target: ``√ᾱ_t · noise − √(1−ᾱ_t) · x0``."""
    a = _gather(alphas_cumprod, timesteps, x0)
    return (a.sqrt() * noise.float() - (1 - a).sqrt() * x0.float()).to(x0.dtype)


def target(prediction_type: str, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
           alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """What the model should output: the noise for "eps", the velocity for "v"."""
    if prediction_type == "eps":
        return noise
    if prediction_type == "v":
        return velocity(x0, noise, timesteps, alphas_cumprod)
    raise ValueError(f"unknown prediction type {prediction_type!r} (expected 'eps' or 'v')")


def predicted_x0(x_t: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor,
                 alphas_cumprod: torch.Tensor, prediction_type: str = "eps") -> torch.Tensor:
    """The clean latent implied by a model output (APT's reconstruction loss decodes this)."""
    a = _gather(alphas_cumprod, timesteps, x_t)
    x_t, prediction = x_t.float(), prediction.float()
    if prediction_type == "eps":
        return (x_t - (1 - a).sqrt() * prediction) / a.sqrt()
    if prediction_type == "v":
        return a.sqrt() * x_t - (1 - a).sqrt() * prediction
    raise ValueError(f"unknown prediction type {prediction_type!r} (expected 'eps' or 'v')")


def snr(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) per timestep (float32, on the timesteps' device)."""
    a = alphas_cumprod.to(torch.float32)[timesteps.long().cpu()]
    return (a / (1 - a)).to(timesteps.device)


def min_snr_weights(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, gamma: float,
                    prediction_type: str = "eps") -> torch.Tensor:
    """Min-SNR-γ loss weights (arXiv 2303.09556): min(SNR, γ)/SNR for eps, min(SNR, γ)/(SNR+1) for v."""
    s = snr(timesteps, alphas_cumprod)
    clipped = torch.clamp(s, max=gamma)
    return clipped / (s + 1) if prediction_type == "v" else clipped / s


def per_sample_mse(prediction: torch.Tensor, target_: torch.Tensor,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over all but the batch dimension of ``weight · (prediction − target)²``, in float32.

    weight: optional per-element map broadcastable to the prediction (the alpha-channel loss weight,
    normalised to mean 1 so the loss stays comparable to the unweighted one).
    """
    err = (prediction.float() - target_.float()) ** 2
    if weight is not None:
        err = err * weight.to(err.device, torch.float32)
    return err.reshape(err.shape[0], -1).mean(dim=1)


def sample_timesteps(batch: int, generator: torch.Generator | None = None, num_timesteps: int = 1000,
                     low: int = 0, high: int | None = None) -> torch.Tensor:
    """Uniform integer timesteps in [low, high) on the generator's device (CPU by default)."""
    high = num_timesteps if high is None else high
    device = generator.device if generator is not None else "cpu"
    return torch.randint(low, high, (batch,), generator=generator, device=device)


def sample_noise(like: torch.Tensor, generator: torch.Generator | None = None,
                 offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise shaped like `like` (drawn on the generator's device, then moved), with optional
    offset noise: ``+ offset · N(0, 1)`` constant over each sample's channel (B, C, 1, 1)."""
    device = generator.device if generator is not None else like.device
    noise = torch.randn(like.shape, generator=generator, device=device, dtype=torch.float32)
    if offset:
        noise = noise + offset * torch.randn((like.shape[0], like.shape[1]) + (1,) * (like.ndim - 2),
                                             generator=generator, device=device, dtype=torch.float32)
    return noise.to(like.device, like.dtype)


def denoising_loss(adapter, latents: torch.Tensor, cond: torch.Tensor, **kwargs) -> torch.Tensor:
    """The standard latent-diffusion loss for one batch through ``adapter.predict``: scalar mean of
    :func:`denoising_losses` (same arguments)."""
    return denoising_losses(adapter, latents, cond, **kwargs).mean()


def denoising_losses(adapter, latents: torch.Tensor, cond: torch.Tensor, *,
                     generator: torch.Generator | None = None, weight: torch.Tensor | None = None,
                     min_snr_gamma: float = 0.0, noise_offset: float = 0.0,
                     timesteps: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The standard latent-diffusion loss of each sample of one batch through ``adapter.predict``: (B,).

    Draws t ~ U{0..T−1} and ε (with `generator`, so a seeded run repeats exactly), noises the latents,
    compares the prediction with ε (or v) — weighted per element by `weight` and per sample by min-SNR-γ
    when `min_snr_gamma` > 0.
    """
    ac = adapter.alphas_cumprod
    latents = latents.to(getattr(adapter, "device", latents.device))  # batches arrive on the CPU
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], generator, num_timesteps=ac.shape[0])
    if noise is None:
        noise = sample_noise(latents, generator, noise_offset)
    noise = noise.to(latents.device, latents.dtype)
    noisy = add_noise(latents, noise, timesteps, ac)
    t = timesteps.to(latents.device)
    prediction = adapter.predict(noisy, t, cond)
    losses = per_sample_mse(prediction, target(adapter.prediction_type, latents, noise, timesteps, ac), weight)
    if min_snr_gamma > 0:
        losses = losses * min_snr_weights(timesteps, ac, min_snr_gamma, adapter.prediction_type).to(losses.device)
    return losses
