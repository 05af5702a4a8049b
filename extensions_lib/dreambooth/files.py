"""What a DreamBooth run writes: an LDM-layout checkpoint (full mode) or a kohya LoRA file.

Checkpoints go through the backend's key map (the same tables that load them), so a saved file reloads
into equal weights bit for bit; a v-prediction model gets ``<name>.yaml`` beside it (the WebUI, like our
backend, reads the parameterization from there). Provenance and the run's options go into the
safetensors metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..atomic import atomic_path, write_text
from ..errors import AlchemyError
from ..options import to_dict

V_MODEL_YAML = """\
model:
  base_learning_rate: 1.0e-4
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    parameterization: "v"
    linear_start: 0.00085
    linear_end: 0.0120
    num_timesteps_cond: 1
    log_every_t: 200
    timesteps: 1000
    first_stage_key: "jpg"
    cond_stage_key: "txt"
    image_size: 96
    channels: 4
    cond_stage_trainable: false
    conditioning_key: crossattn
    monitor: val/loss_simple_ema
    scale_factor: 0.18215
    use_ema: False
    unet_config:
      target: ldm.modules.diffusionmodules.openaimodel.UNetModel
      params:
        use_checkpoint: True
        use_fp16: True
        image_size: 32
        in_channels: 4
        out_channels: 4
        model_channels: 320
        attention_resolutions: [ 4, 2, 1 ]
        num_res_blocks: 2
        channel_mult: [ 1, 2, 4, 4 ]
        num_head_channels: 64
        use_linear_in_transformer: True
        transformer_depth: 1
        context_dim: 1024
        legacy: False
    first_stage_config:
      target: ldm.models.autoencoder.AutoencoderKL
      params:
        embed_dim: 4
        monitor: val/rec_loss
        ddconfig:
          double_z: true
          z_channels: 4
          resolution: 256
          in_channels: 3
          out_ch: 3
          ch: 128
          ch_mult: [ 1, 2, 4, 4 ]
          num_res_blocks: 2
          attn_resolutions: []
          dropout: 0.0
        lossconfig:
          target: torch.nn.Identity
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder
      params:
        freeze: True
        layer: "penultimate"
"""
"""The SD2 768-v inference config (stable-diffusion v2 ``v2-inference-v.yaml``), written beside v-models."""


def metadata(provenance, options, extra: dict[str, str] | None = None) -> dict[str, str]:
    out = provenance.to_metadata()
    out["alchemy_dreambooth_options"] = json.dumps(to_dict(options), sort_keys=True)
    out.update(extra or {})
    return out


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def save_checkpoint(adapter, path: Path, meta: dict[str, str], fp16: bool = False) -> Path:
    """The adapter's current weights as an LDM single file; ``<name>.yaml`` beside it for v-models."""
    tensors_of = getattr(adapter, "ldm_state_dict", None)
    if tensors_of is None:
        raise AlchemyError("this model cannot be written as a checkpoint here",
                           fix="train in full mode with the standalone backend (alchemy dreambooth train --ckpt)")
    tensors = {}
    for key, t in tensors_of():
        t = t.detach().cpu()
        if fp16 and t.is_floating_point() and "alphas_cumprod" not in key and key != "betas":
            t = t.half()
        tensors[key] = t.contiguous()
    _save_safetensors(tensors, Path(path), {"format": "pt", **meta})
    if getattr(adapter, "prediction_type", "eps") == "v":
        write_text(Path(path).with_suffix(".yaml"), V_MODEL_YAML)
    return Path(path)


def save_lora(patch, path: Path, meta: dict[str, str], fp16: bool = False) -> Path:
    """The LoRA patch's layers as a kohya-format ``.safetensors``."""
    tensors = patch.state_dict(torch.float16 if fp16 else None)
    _save_safetensors(tensors, Path(path), {"ss_network_module": "networks.lora", **meta})
    return Path(path)
