"""APT's objective: the denoising loss of the classifier-free-guided prediction.

``guided_prediction`` runs the UNet once on the doubled batch ``[x_t, x_t]`` with ``[c_neg, c_pos]``
(``fused``), or twice, once per conditioning (the naive way; ``bench/bench_apt.py`` compares them and the
tests check they agree). :func:`apt_loss` adds DreamArtist's per-pixel weights and, optionally, the
reconstruction loss: the guided clean-latent estimate decoded by the VAE, with gradients, L1 to the image.
"""
from __future__ import annotations

import torch

from ..train.diffusion_loss import (add_noise, min_snr_weights, per_sample_mse, predicted_x0, sample_noise,
                                    sample_timesteps, target)
from .cfg_scale import CfgScale


def guided_prediction(adapter, noisy: torch.Tensor, timesteps: torch.Tensor, cond_neg: torch.Tensor,
                      cond_pos: torch.Tensor, scale: torch.Tensor, *, fused: bool = True) -> torch.Tensor:
    """``e_neg + s·(e_pos − e_neg)`` with s per sample (float32)."""
    if fused:
        both = adapter.predict(torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps]),
                               torch.cat([cond_neg, cond_pos]))
        e_neg, e_pos = both.float().chunk(2)
    else:
        e_neg = adapter.predict(noisy, timesteps, cond_neg).float()
        e_pos = adapter.predict(noisy, timesteps, cond_pos).float()
    s = scale.to(e_neg.device, torch.float32).reshape(-1, *([1] * (e_neg.ndim - 1)))
    return e_neg + s * (e_pos - e_neg)


def apt_loss(adapter, latents: torch.Tensor, cond_neg: torch.Tensor, cond_pos: torch.Tensor, cfg: CfgScale, *,
             generator: torch.Generator | None = None, weight: torch.Tensor | None = None,
             pixels: torch.Tensor | None = None, reconstruction_weight: float = 0.0, min_snr_gamma: float = 0.0,
             noise_offset: float = 0.0, timesteps: torch.Tensor | None = None, fused: bool = True) -> torch.Tensor:
    """Scalar loss of one batch: mean over samples of the (weighted) MSE of the guided prediction against
    the noise (or velocity), plus ``reconstruction_weight · L1(decode(x̂0), pixels)`` when `pixels` is given.

    Timesteps and noise are drawn from `generator` in the order :func:`~extensions_lib.train.diffusion_loss.
    denoising_loss` draws them, so a seeded run repeats exactly.
    """
    ac = adapter.alphas_cumprod
    latents = latents.to(getattr(adapter, "device", latents.device))
    if timesteps is None:
        timesteps = sample_timesteps(latents.shape[0], generator, num_timesteps=ac.shape[0])
    noise = sample_noise(latents, generator, noise_offset)
    noisy = add_noise(latents, noise, timesteps, ac)
    t = timesteps.to(latents.device)
    guided = guided_prediction(adapter, noisy, t, cond_neg, cond_pos, cfg.at(timesteps.cpu(), ac.shape[0]),
                               fused=fused)
    losses = per_sample_mse(guided, target(adapter.prediction_type, latents, noise, timesteps, ac), weight)
    if min_snr_gamma > 0:
        losses = losses * min_snr_weights(timesteps, ac, min_snr_gamma, adapter.prediction_type).to(losses.device)
    loss = losses.mean()
    if pixels is not None and reconstruction_weight:
        x0 = predicted_x0(noisy, guided, timesteps, ac, adapter.prediction_type)
        decoded = adapter.decode_latents(x0).float()
        loss = loss + reconstruction_weight * (decoded - pixels.to(decoded.device, torch.float32)).abs().mean()
    return loss
