"""The samplers Alchemy offers, each a sampling function paired with its noise schedule."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import AlchemyError
from .ddim import sample_ddim
from .euler import sample_euler, sample_euler_ancestral
from .schedule import ddim_sigmas, linspace_sigmas


@dataclass(frozen=True)
class SamplerSpec:
    label: str
    """The WebUI's name for it (written to infotext; what ``sd_samplers.samplers_map`` knows)."""
    sample: Callable[..., torch.Tensor]
    """``sample(model_fn, x, sigmas, callback=None, ...)``."""
    schedule: Callable[[torch.Tensor, int], torch.Tensor]
    """``schedule(alphas_cumprod, steps) -> steps + 1 sigmas``."""
    stochastic: bool = False
    """Takes ``noise_fn`` for the fresh noise it adds at every step."""
    vp_start: bool = False
    """Starts from x_T of the variance-preserving process (as DDIM does), i.e. noise * sqrt(1 + sigma_max**2)
    in sigma space, instead of noise * sigma_max."""

    def initial_noise_scale(self, sigma_max: float) -> float:
        return (1 + sigma_max**2) ** 0.5 if self.vp_start else sigma_max


SAMPLERS = {
    "euler": SamplerSpec("Euler", sample_euler, linspace_sigmas),
    "euler_a": SamplerSpec("Euler a", sample_euler_ancestral, linspace_sigmas, stochastic=True),
    "ddim": SamplerSpec("DDIM", sample_ddim, ddim_sigmas, vp_start=True),
}


def find_sampler(name: str) -> SamplerSpec:
    """Look a sampler up by our key ("euler_a") or the WebUI's name ("Euler a", "k_euler_a"), any case."""
    wanted = name.strip().lower().removeprefix("k_").replace(" ", "_")
    if wanted in SAMPLERS:
        return SAMPLERS[wanted]
    raise AlchemyError(f"unknown sampler {name!r}", fix=f"use one of: {', '.join(SAMPLERS)}")
