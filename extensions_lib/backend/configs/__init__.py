"""Model configs kept in the repository, so nothing is downloaded to build a model.

One folder per family (``sd1`` = SD1.5, ``sd2`` = SD2 512 eps, ``sd2-v`` = SD2 768 v) holding diffusers-style
``unet.json``, ``vae.json``, ``text_encoder.json`` (transformers ``CLIPTextConfig``; SD2's OpenCLIP text
tower is expressed as a 24-layer gelu CLIP text model), ``scheduler.json`` and ``model.json`` (the facts
the WebUI keeps on ``sd_model``: family, prediction type, text-encoder kind, latent scale factor).
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path

FAMILIES = ("sd1", "sd2", "sd2-v")
_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to build one model's modules and interpret its outputs."""

    name: str                  # "sd1", "sd2", "sd2-v", or "tiny-sd1" ...
    family: str                # "sd1" | "sd2"
    prediction_type: str       # "eps" | "v"
    text_encoder_kind: str     # "clip" (SD1, HF CLIP-L) | "open_clip" (SD2, OpenCLIP ViT-H)
    scale_factor: float
    unet: dict = field(repr=False)
    vae: dict = field(repr=False)
    text_encoder: dict = field(repr=False)
    scheduler: dict = field(repr=False)

    def with_prediction_type(self, prediction_type: str) -> "ModelConfig":
        scheduler = dict(self.scheduler, prediction_type="v_prediction" if prediction_type == "v" else "epsilon")
        return replace(self, prediction_type=prediction_type, scheduler=scheduler)

    def component(self, name: str) -> dict:
        return copy.deepcopy(getattr(self, name))


@lru_cache(maxsize=None)
def _read(family: str, part: str) -> str:
    return (_DIR / family / f"{part}.json").read_text(encoding="utf-8")


def load_config(family: str) -> ModelConfig:
    """The full-size config of `family` ("sd1", "sd2" or "sd2-v")."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    facts = json.loads(_read(family, "model"))
    return ModelConfig(
        name=family, family=facts["family"], prediction_type=facts["prediction_type"],
        text_encoder_kind=facts["text_encoder_kind"], scale_factor=float(facts["scale_factor"]),
        **{part: json.loads(_read(family, part)) for part in ("unet", "vae", "text_encoder", "scheduler")})


def alphas_cumprod_from_schedule(scheduler: dict) -> "torch.Tensor":
    """(T,) float64 cumulative alphas of the LDM "scaled linear" schedule (ldm ``make_beta_schedule``)."""
    import torch

    if scheduler.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise ValueError(f"unsupported beta_schedule {scheduler.get('beta_schedule')!r}")
    steps = int(scheduler["num_train_timesteps"])
    betas = torch.linspace(scheduler["beta_start"] ** 0.5, scheduler["beta_end"] ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def build_modules(config: ModelConfig) -> dict:
    """{"unet", "vae", "text_encoder"}: diffusers/transformers modules of `config`, default-initialised on
    the current default device (build under ``torch.device("meta")`` to get them for free)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return {"unet": UNet2DConditionModel.from_config(config.component("unet")),
            "vae": AutoencoderKL.from_config(config.component("vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**config.component("text_encoder")))}
