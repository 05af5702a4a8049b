"""kohya LoRA names of the WebUI's own (LDM) model modules: the inverse of what the host's Lora loader does.

The WebUI's built-in Lora extension names each module of ``sd_model.model`` and of
``cond_stage_model.wrapped`` by its dotted path with '.' → '_' and converts a file's kohya (diffusers-path)
names onto those. Training inside the WebUI attaches LoRA layers to the LDM modules themselves, so each
trained layer needs the kohya name that the host converts back to that very module:

- UNet (``diffusion_model.…`` under ``sd_model.model``): the attention blocks sit at index 1 of
  ``input_blocks.{1 + 3·b + j}``, ``middle_block`` and ``output_blocks.{3·b + j}``, and are
  ``down_blocks.b.attentions.j`` / ``mid_block.attentions.0`` / ``up_blocks.b.attentions.j`` in
  diffusers; inside a block (proj_in, transformer_blocks.N.attn1.to_q, ff.net.0.proj, …) both use the
  same names.
- SD1 text encoder (transformers ``CLIPTextModel`` at ``transformer``): ``transformer.text_model.X`` is
  ``lora_te_text_model_X``.
- SD2 text encoder (open_clip at ``model``): ``model.transformer.resblocks.N.mlp.c_fc``/``c_proj`` are
  kohya's ``mlp_fc1``/``mlp_fc2``; the ``nn.MultiheadAttention`` ``…resblocks.N.attn`` holds q, k, v
  stacked plus ``out_proj``, written as kohya's four ``self_attn_{q,k,v,out}_proj`` layers (the host
  applies them only together).
"""
from __future__ import annotations

import re

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"
MHA_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "out_proj")

_UNET_BLOCK = re.compile(r"diffusion_model\.(input_blocks\.\d+|middle_block|output_blocks\.\d+)\.1\.(.+)$")
_UNET_INNER = re.compile(r"(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_[qkv]|to_out\.0)|ff\.net\.(0\.proj|2)))$")
_SD1_TE = re.compile(r"transformer\.text_model\.(encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12]))$")
_SD2_TE_MLP = re.compile(r"model\.transformer\.resblocks\.(\d+)\.mlp\.(c_fc|c_proj)$")
_SD2_TE_ATTN = re.compile(r"model\.transformer\.resblocks\.(\d+)\.attn$")


def _underscored(path: str) -> str:
    return path.replace(".", "_")


def unet_kohya_name(path: str) -> str | None:
    """The kohya name of an LDM UNet module path (relative to ``sd_model.model``), or None when the module
    is not one a kohya LoRA trains (attention/MLP/projection layers of the transformer blocks)."""
    m = _UNET_BLOCK.match(path)
    if m is None or _UNET_INNER.match(m.group(2)) is None:
        return None
    block, inner = m.group(1), _underscored(m.group(2))
    if block == "middle_block":
        return f"{UNET_PREFIX}mid_block_attentions_0_{inner}"
    kind, index = block.split(".")[0], int(block.split(".")[1])
    if kind == "input_blocks":
        if index < 1 or (index - 1) % 3 == 2:
            return None  # input_blocks.0 is conv_in; every third block is a downsampler
        return f"{UNET_PREFIX}down_blocks_{(index - 1) // 3}_attentions_{(index - 1) % 3}_{inner}"
    return f"{UNET_PREFIX}up_blocks_{index // 3}_attentions_{index % 3}_{inner}"


def te_kohya_names(path: str) -> tuple[str, ...]:
    """The kohya name(s) of a text-encoder module path (relative to ``cond_stage_model.wrapped``): one for
    a Linear, four (q, k, v, out) for SD2's MultiheadAttention, none for modules a LoRA does not train."""
    if (m := _SD1_TE.match(path)) is not None:
        return (f"{TE_PREFIX}text_model_{_underscored(m.group(1))}",)
    if (m := _SD2_TE_MLP.match(path)) is not None:
        fc = "fc1" if m.group(2) == "c_fc" else "fc2"
        return (f"{TE_PREFIX}text_model_encoder_layers_{m.group(1)}_mlp_{fc}",)
    if (m := _SD2_TE_ATTN.match(path)) is not None:
        return tuple(f"{TE_PREFIX}text_model_encoder_layers_{m.group(1)}_self_attn_{p}" for p in MHA_PROJECTIONS)
    return ()


def is_ldm_unet(root) -> bool:
    """Whether `root` is the host's ``sd_model.model`` (an LDM ``DiffusionWrapper``), not a diffusers UNet."""
    return hasattr(root, "diffusion_model")


def text_encoder_root(cond_stage_model):
    """The module the host names text-encoder layers under: ``cond_stage_model.wrapped`` (its prompt
    wrapper's inner ``FrozenCLIPEmbedder``/``FrozenOpenCLIPEmbedder``), or the model itself without one."""
    return getattr(cond_stage_model, "wrapped", cond_stage_model)
