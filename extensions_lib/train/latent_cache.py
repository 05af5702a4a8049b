"""VAE latents of the training images, encoded once per run (the WebUI's "latent sampling method").

- "once": one sample ``mean + std·ε`` per image, drawn at encode time and reused every epoch.
- "deterministic": the distribution's mean (the WebUI sets std to 0, so its sample is the mean).
- "random": mean and std are kept and a fresh sample is drawn every time the image is used.

All three keep results on the CPU and call the VAE exactly once per image. The "once" sample of image i
is drawn from a generator seeded with (seed, i), so a resumed run re-encodes to the same latents.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import AlchemyError
from .dataset import ImageDataset, alpha_weight

METHODS = ("once", "deterministic", "random")


def image_generator(seed: int, index: int) -> torch.Generator:
    """The generator for image `index`'s "once" sample: independent of batching and order."""
    return torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))


class LatentCache:
    """Encodes a dataset's images with ``adapter.encode_images`` and serves latents and loss weights."""

    def __init__(self, dataset: ImageDataset, adapter, *, method: str = "once", seed: int = 0,
                 use_weight: bool = False, encode_batch: int = 4,
                 on_progress: Callable[[int, int], None] | None = None):
        if method not in METHODS:
            raise AlchemyError(f"option latent_sampling_method must be one of {list(METHODS)}, got {method!r}")
        self.method = method
        self.count = len(dataset)
        self._stored: list[torch.Tensor] = [None] * self.count  # type: ignore[list-item]
        self._std: list[torch.Tensor] = [None] * self.count if method == "random" else []  # type: ignore[list-item]
        self._weights: list[torch.Tensor | None] = [None] * self.count
        self.scale = 1.0
        self._encode(dataset, adapter, seed, use_weight, max(1, encode_batch), on_progress)

    @torch.no_grad()
    def _encode(self, dataset, adapter, seed, use_weight, encode_batch, on_progress):
        done = 0
        with adapter.use("vae"):
            for group in dataset.groups():  # same size, so images can share an encode call
                for start in range(0, len(group), encode_batch):
                    chunk = group[start:start + encode_batch]
                    loaded = [dataset.load(i) for i in chunk]
                    pixels = torch.stack([p for p, _ in loaded]).to(adapter.device)
                    dist = adapter.encode_images(pixels)
                    mean, std = dist.mean.float().cpu(), dist.std.float().cpu()
                    self.scale = float(dist.scale)
                    for row, (index, (_, alpha)) in enumerate(zip(chunk, loaded)):
                        m, s = mean[row:row + 1], std[row:row + 1]
                        if self.method == "once":
                            noise = torch.randn(m.shape, generator=image_generator(seed, index))
                            self._stored[index] = ((m + s * noise) * self.scale)[0]
                        elif self.method == "deterministic":
                            self._stored[index] = (m * self.scale)[0]
                        else:
                            self._stored[index] = m[0].clone()
                            self._std[index] = s[0].clone()
                        if use_weight:
                            c, h, w = self._stored[index].shape
                            self._weights[index] = alpha_weight(alpha, (h, w), c)
                    done += len(chunk)
                    if on_progress is not None:
                        on_progress(done, self.count)

    def latents(self, index: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents (C, h, w) of image `index`; "random" draws a new sample with `generator`."""
        if self.method != "random":
            return self._stored[index]
        mean, std = self._stored[index], self._std[index]
        noise = torch.randn(mean.shape, generator=generator)
        return (mean + std * noise) * self.scale

    def weight(self, index: int) -> torch.Tensor | None:
        """Per-element loss weight (C, h, w) from the image's alpha, or None unless use_weight was set."""
        return self._weights[index]
