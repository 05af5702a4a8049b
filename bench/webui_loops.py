"""The WebUI v1.10.1's own training-step pieces, restated for the benchmarks (never used by Alchemy):
``sd_hijack_checkpoint.add()`` and ldm's ``LatentDiffusion.forward`` -> ``p_losses``.

Facts: shared/reference/a1111-host.md 5.5 (the training loops) and 3.5 (the ldm diffusion wrapper).
"""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def host_checkpointing(unet: torch.nn.Module, on: bool = True):
    """``sd_hijack_checkpoint.add()`` on a diffusers UNet: every transformer block's and resnet block's
    forward runs under ``torch.utils.checkpoint`` (activations recomputed in the backward pass)."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.utils.checkpoint import checkpoint

    blocks = [m for m in unet.modules() if isinstance(m, (BasicTransformerBlock, ResnetBlock2D))] if on else []
    for m in blocks:
        m.forward = (lambda f: lambda *a, **k: checkpoint(f, *a, use_reentrant=False, **k))(m.forward)
    try:
        yield
    finally:
        for m in blocks:
            del m.forward


def ldm_loss(sd_model, x: torch.Tensor, c, generator: torch.Generator | None = None) -> torch.Tensor:
    """``sd_model.forward(x, c)[0]`` of ldm's LatentDiffusion (eps parameterisation, as SD1): t uniform,
    noise, ``apply_model``, per-sample MSE, ``loss / exp(logvar_t) + logvar_t``, mean (l_simple_weight 1,
    original_elbo_weight 0)."""
    t = torch.randint(0, sd_model.num_timesteps, (x.shape[0],), generator=generator)
    noise = torch.randn(x.shape, generator=generator)
    ac = sd_model.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_noisy = ac.sqrt() * x + (1 - ac).sqrt() * noise
    output = sd_model.apply_model(x_noisy, t, c)
    loss_simple = ((output - noise) ** 2).mean(dim=(1, 2, 3))
    logvar_t = sd_model.logvar[t]
    return (loss_simple / torch.exp(logvar_t) + logvar_t).mean()
