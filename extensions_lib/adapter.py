"""The one interface between Alchemy's core and a Stable Diffusion model.

Trainers, loaders and previews only ever talk to a :class:`ModelAdapter`. Two implementations exist:
``extensions_lib.backend.standalone.StandaloneModel`` (diffusers/transformers modules loaded from a
WebUI-style single-file checkpoint) and, inside the WebUI, an adapter over ``shared.sd_model``
(``scripts/`` glue). Everything else is written against this file, so keep it small.

Conventions
- Images are NCHW float tensors in [-1, 1]; latents are already multiplied by ``vae_scale_factor``.
- Timesteps are integer indices into ``alphas_cumprod`` (0..999).
- Text conditioning is (B, 77*k, C): k chunks of 75 tokens, each padded to 77 with start/end tokens.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence, runtime_checkable

import torch


@dataclass
class TextEncoderInfo:
    """One text encoder of the model (SD1/SD2 have one; SDXL has ``clip_l`` and ``clip_g``).

    key: the name embedding files use for this encoder's vectors ("clip_l", "clip_g"; "" for SD1/SD2).
    width: the token-embedding width (768 SD1, 1024 SD2, 1280 SDXL clip_g).
    token_embedding: the ``nn.Embedding`` (or a module wrapping it) whose output the prompt encoder
        uses; loaders wrap it to splice vectors in, trainers read ``.weight`` for init text.
    id_start / id_end / id_pad: the special token ids this encoder pads chunks with.
    """

    key: str
    width: int
    token_embedding: torch.nn.Module
    id_start: int = 49406
    id_end: int = 49407
    id_pad: int = 49407
    comma_token: int = 267


@runtime_checkable
class Tokenizer(Protocol):
    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text without start/end tokens and without truncation."""
        ...


@runtime_checkable
class ModelAdapter(Protocol):
    # --- identity ------------------------------------------------------------------------------------
    family: str
    """"sd1", "sd2" or "sdxl"."""
    prediction_type: str
    """"eps" (noise) or "v" (velocity) — what the UNet predicts."""
    context_dim: int
    """Cross-attention context width (768 SD1, 1024 SD2, 2048 SDXL)."""
    checkpoint_name: str
    """File stem of the loaded checkpoint, as the WebUI shows it."""
    checkpoint_hash: str
    """sha256[:10] of the checkpoint file, the WebUI's short hash ("" when unknown)."""

    # --- text ----------------------------------------------------------------------------------------
    tokenizer: Tokenizer
    text_encoders: list[TextEncoderInfo]

    def encode_token_chunks(self, tokens: torch.Tensor, clip_skip: int = 1) -> torch.Tensor:
        """Encode (N, 77) token-id chunks (start/end/pad included) to (N, 77, C) conditioning.

        Runs through each encoder's ``token_embedding`` module, so a patch on it takes effect.
        clip_skip: 1 = last layer; N > 1 = hidden state N from the end (SD1 then applies the final
        layer norm, as the WebUI does). SD2 always uses the penultimate layer (its own definition of 1).
        """
        ...

    # --- latents -------------------------------------------------------------------------------------
    vae_scale_factor: float

    def encode_images(self, images: torch.Tensor) -> "LatentDistribution":
        """VAE-encode images in [-1, 1]; the result's ``sample()``/``mode()`` are already scaled."""
        ...

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Decode scaled latents to images in [-1, 1] (not clamped)."""
        ...

    # --- denoiser ------------------------------------------------------------------------------------
    alphas_cumprod: torch.Tensor
    """(1000,) float32 on CPU: the training noise schedule."""

    def predict(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """UNet output (eps or v, see ``prediction_type``) for integer timesteps and (B, T, C) cond."""
        ...

    def attention_modules(self) -> list[tuple[str, torch.nn.Module]]:
        """Every attention module of the UNet (self and cross) as (qualified name, module).

        Each module has ``to_k`` and ``to_v`` linear layers; cross-attention ones see the text context.
        Hypernetwork loaders patch these.
        """
        ...

    # --- placement -----------------------------------------------------------------------------------
    device: torch.device
    """Where computation runs (the UNet's device when parts are offloaded)."""
    dtype: torch.dtype
    """The dtype the UNet computes in."""
    moves_parts: bool
    """True when the adapter (or its host) moves parts between devices itself: the WebUI's
    ``--medvram``/``--lowvram``, a standalone model loaded with ``offload``. Trainers then leave placement
    to it (moving parts as well would fight it)."""

    def modules(self) -> dict[str, torch.nn.Module]:
        """{"unet": ..., "vae": ..., "text_encoder": ... (, "text_encoder_2")} for freezing/offloading."""
        ...

    def use(self, *parts: str) -> contextlib.AbstractContextManager:
        """Context manager: have `parts` (keys of ``modules()``) on ``device`` for the block's duration.

        Offloading implementations move other parts away; the rest may treat it as a no-op.
        """
        ...


@dataclass
class LatentDistribution:
    """Diagonal Gaussian over scaled latents (what the VAE encoder outputs)."""

    mean: torch.Tensor
    std: torch.Tensor
    scale: float = field(default=1.0)

    def mode(self) -> torch.Tensor:
        return self.mean * self.scale

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype) \
            if generator is None or generator.device == self.mean.device else \
            torch.randn(self.mean.shape, generator=generator, dtype=self.mean.dtype).to(self.mean.device)
        return (self.mean + self.std * noise) * self.scale


@contextlib.contextmanager
def nullcontext() -> Iterator[None]:
    yield
