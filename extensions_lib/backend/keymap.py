"""LDM (WebUI single-file) <-> diffusers state-dict key mapping, exact in both directions.

The mapping is a table of key *prefixes* enumerated from the model's layout (block counts), shared by
both directions, plus two tensor transforms:

- the VAE mid-block attention: q/k/v/proj_out are 1x1 convs in LDM and linear layers in diffusers
  (``(C, C, 1, 1)`` <-> ``(C, C)``);
- the SD2 OpenCLIP text tower: ``attn.in_proj_weight/bias`` holds q, k and v stacked along dim 0;
  diffusers' CLIP layout has separate ``q_proj``/``k_proj``/``v_proj``.

It works key by key (:func:`ldm_to_diffusers` returns the pieces one LDM tensor becomes), so a loader
converts tensor by tensor without holding two copies of the weights. LDM keys with no diffusers
counterpart (``model_ema.*``, ``alphas_cumprod``, ``betas``, SD2 ``text_projection``/``logit_scale``,
SD1 ``position_ids`` ...) map to the component ``"extra"`` under their own name, so that
LDM -> diffusers -> LDM reproduces every tensor bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Iterator

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."       # SD1: HF CLIPTextModel
OPEN_CLIP_PREFIX = "cond_stage_model.model."        # SD2: OpenCLIP text tower
EXTRA = "extra"
COMPONENTS = ("unet", "vae", "text_encoder")

# Buffers transformers <4.31 saves but later versions recompute; real SD1 files carry them.
_PASS_THROUGH = {CLIP_PREFIX + "text_model.embeddings.position_ids"}


@dataclass(frozen=True)
class Layout:
    """The structural facts the key arithmetic needs (all read from a model config)."""

    unet_attention: tuple[bool, ...] = (True, True, True, False)   # per down block: has cross-attention
    unet_layers_per_block: int = 2
    vae_blocks: int = 4
    vae_layers_per_block: int = 2
    text_kind: str = "clip"          # "clip" | "open_clip"
    text_layers: int = 12

    @classmethod
    def from_config(cls, config) -> "Layout":
        """Layout of an ``extensions_lib.backend.configs.ModelConfig``."""
        unet, vae, text = config.unet, config.vae, config.text_encoder
        return cls(
            unet_attention=tuple("CrossAttn" in t for t in unet["down_block_types"]),
            unet_layers_per_block=int(unet["layers_per_block"]),
            vae_blocks=len(vae["block_out_channels"]), vae_layers_per_block=int(vae["layers_per_block"]),
            text_kind=config.text_encoder_kind, text_layers=int(text["num_hidden_layers"]))


@dataclass(frozen=True)
class Piece:
    """One diffusers tensor made from (part of) one LDM tensor.

    split: (index, count) — this piece is chunk `index` of `count` equal chunks along dim 0.
    conv1x1: the LDM tensor is a 1x1 conv weight, the diffusers one a linear weight.
    """

    component: str
    key: str
    split: tuple[int, int] = (0, 1)
    conv1x1: bool = False


# --- prefix table ---------------------------------------------------------------------------------------

def _resnet(ldm: str, dif: str) -> list[tuple[str, str]]:
    """LDM UNet ResBlock sub-keys -> diffusers ResnetBlock2D."""
    names = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
             ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]
    return [(ldm + a, dif + b) for a, b in names]


def _unet_pairs(layout: Layout) -> list[tuple[str, str]]:
    p = UNET_PREFIX
    pairs = [(p + "time_embed.0.", "time_embedding.linear_1."), (p + "time_embed.2.", "time_embedding.linear_2."),
             (p + "input_blocks.0.0.", "conv_in."), (p + "out.0.", "conv_norm_out."), (p + "out.2.", "conv_out.")]
    lpb, blocks = layout.unet_layers_per_block, len(layout.unet_attention)
    for b, has_attn in enumerate(layout.unet_attention):
        for layer in range(lpb):
            i = 1 + b * (lpb + 1) + layer
            pairs += _resnet(f"{p}input_blocks.{i}.0.", f"down_blocks.{b}.resnets.{layer}.")
            if has_attn:
                pairs.append((f"{p}input_blocks.{i}.1.", f"down_blocks.{b}.attentions.{layer}."))
        if b < blocks - 1:
            pairs.append((f"{p}input_blocks.{1 + b * (lpb + 1) + lpb}.0.op.", f"down_blocks.{b}.downsamplers.0.conv."))
    pairs += _resnet(p + "middle_block.0.", "mid_block.resnets.0.")
    pairs.append((p + "middle_block.1.", "mid_block.attentions.0."))
    pairs += _resnet(p + "middle_block.2.", "mid_block.resnets.1.")
    # Up blocks mirror the down blocks: up block b has the attention of down block (blocks-1-b).
    for b in range(blocks):
        has_attn = layout.unet_attention[blocks - 1 - b]
        for layer in range(lpb + 1):
            i = b * (lpb + 1) + layer
            pairs += _resnet(f"{p}output_blocks.{i}.0.", f"up_blocks.{b}.resnets.{layer}.")
            if has_attn:
                pairs.append((f"{p}output_blocks.{i}.1.", f"up_blocks.{b}.attentions.{layer}."))
            if b < blocks - 1 and layer == lpb:
                pairs.append((f"{p}output_blocks.{i}.{2 if has_attn else 1}.conv.", f"up_blocks.{b}.upsamplers.0.conv."))
    return pairs


def _vae_pairs(layout: Layout) -> list[tuple[str, str]]:
    p = VAE_PREFIX
    pairs = [(p + n, n) for n in ("encoder.conv_in.", "encoder.conv_out.", "decoder.conv_in.", "decoder.conv_out.",
                                  "quant_conv.", "post_quant_conv.")]
    pairs += [(p + "encoder.norm_out.", "encoder.conv_norm_out."), (p + "decoder.norm_out.", "decoder.conv_norm_out.")]

    def resnet(ldm: str, dif: str) -> list[tuple[str, str]]:
        return [(ldm + n, dif + n) for n in ("norm1.", "conv1.", "norm2.", "conv2.")] + \
            [(ldm + "nin_shortcut.", dif + "conv_shortcut.")]

    n = layout.vae_blocks
    for i in range(n):
        for j in range(layout.vae_layers_per_block):
            pairs += resnet(f"{p}encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}.")
        if i < n - 1:
            pairs.append((f"{p}encoder.down.{i}.downsample.conv.", f"encoder.down_blocks.{i}.downsamplers.0.conv."))
        # LDM numbers decoder levels from the lowest resolution up; diffusers in execution order.
        for j in range(layout.vae_layers_per_block + 1):
            pairs += resnet(f"{p}decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}.")
        if i < n - 1:
            pairs.append((f"{p}decoder.up.{n - 1 - i}.upsample.conv.", f"decoder.up_blocks.{i}.upsamplers.0.conv."))
    for side in ("encoder", "decoder"):
        pairs += resnet(f"{p}{side}.mid.block_1.", f"{side}.mid_block.resnets.0.")
        pairs += resnet(f"{p}{side}.mid.block_2.", f"{side}.mid_block.resnets.1.")
        pairs.append((f"{p}{side}.mid.attn_1.norm.", f"{side}.mid_block.attentions.0.group_norm."))
    return pairs


# VAE attention projections: 1x1 conv in LDM, linear in diffusers.
_VAE_ATTN_PROJ = {"q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}


def _vae_conv1x1_pairs() -> list[tuple[str, str]]:
    return [(f"{VAE_PREFIX}{side}.mid.attn_1.{a}", f"{side}.mid_block.attentions.0.{b}")
            for side in ("encoder", "decoder") for a, b in _VAE_ATTN_PROJ.items()]


def _text_pairs(layout: Layout) -> list[tuple[str, str]]:
    if layout.text_kind == "clip":
        return [(CLIP_PREFIX + "text_model.", "text_model.")]
    p = OPEN_CLIP_PREFIX
    pairs = [(p + "token_embedding.", "text_model.embeddings.token_embedding."),
             (p + "positional_embedding", "text_model.embeddings.position_embedding.weight"),
             (p + "ln_final.", "text_model.final_layer_norm.")]
    for n in range(layout.text_layers):
        ldm, dif = f"{p}transformer.resblocks.{n}.", f"text_model.encoder.layers.{n}."
        pairs += [(ldm + "ln_1.", dif + "layer_norm1."), (ldm + "ln_2.", dif + "layer_norm2."),
                  (ldm + "attn.out_proj.", dif + "self_attn.out_proj."),
                  (ldm + "mlp.c_fc.", dif + "mlp.fc1."), (ldm + "mlp.c_proj.", dif + "mlp.fc2.")]
    return pairs


def _open_clip_in_proj(layout: Layout) -> dict[str, list[str]]:
    """LDM in_proj key -> the three diffusers keys (q, k, v) it is split into."""
    out = {}
    if layout.text_kind != "open_clip":
        return out
    for n in range(layout.text_layers):
        for ldm_name, dif_name in (("in_proj_weight", "weight"), ("in_proj_bias", "bias")):
            out[f"{OPEN_CLIP_PREFIX}transformer.resblocks.{n}.attn.{ldm_name}"] = [
                f"text_model.encoder.layers.{n}.self_attn.{x}_proj.{dif_name}" for x in "qkv"]
    return out


@dataclass(frozen=True)
class _Tables:
    forward: dict[str, tuple[str, str, bool]]   # ldm prefix -> (component, diffusers prefix, conv1x1)
    backward: dict[tuple[str, str], tuple[str, bool]]
    split_forward: dict[str, list[str]]         # ldm key -> diffusers keys (text component)
    split_backward: dict[str, tuple[str, int, int]]


@lru_cache(maxsize=16)
def _tables(layout: Layout) -> _Tables:
    forward: dict[str, tuple[str, str, bool]] = {}
    for component, pairs, conv in (("unet", _unet_pairs(layout), False), ("vae", _vae_pairs(layout), False),
                                   ("vae", _vae_conv1x1_pairs(), True), ("text_encoder", _text_pairs(layout), False)):
        for ldm, dif in pairs:
            forward[ldm] = (component, dif, conv)
    backward = {(c, dif): (ldm, conv) for ldm, (c, dif, conv) in forward.items()}
    split_forward = _open_clip_in_proj(layout)
    split_backward = {dif: (ldm, i, len(difs)) for ldm, difs in split_forward.items() for i, dif in enumerate(difs)}
    return _Tables(forward, backward, split_forward, split_backward)


def _prefixes(key: str) -> Iterator[tuple[str, str]]:
    """(prefix, rest) for the whole key, then each prefix ending in '.', longest first."""
    yield key, ""
    pos = key.rfind(".")
    while pos >= 0:
        yield key[:pos + 1], key[pos + 1:]
        pos = key.rfind(".", 0, pos)


# --- per-key mapping ------------------------------------------------------------------------------------

def normalize_ldm_key(key: str) -> str:
    """Early SD1 files were saved by transformers < 4.17, whose CLIPTextModel had no ``text_model.``
    level; the WebUI renames those keys on load, and so do we (such files round-trip to the new names)."""
    if key.startswith(CLIP_PREFIX) and not key.startswith(CLIP_PREFIX + "text_model."):
        rest = key[len(CLIP_PREFIX):]
        if rest.startswith(("embeddings.", "encoder.", "final_layer_norm.")):
            return CLIP_PREFIX + "text_model." + rest
    return key


def ldm_to_diffusers(key: str, layout: Layout) -> list[Piece]:
    """The diffusers pieces LDM tensor `key` becomes (one, or three for an OpenCLIP in_proj)."""
    tables = _tables(layout)
    key = normalize_ldm_key(key)
    if key in _PASS_THROUGH:
        return [Piece(EXTRA, key)]
    split = tables.split_forward.get(key)
    if split:
        return [Piece("text_encoder", k, (i, len(split))) for i, k in enumerate(split)]
    for prefix, rest in _prefixes(key):
        hit = tables.forward.get(prefix)
        if hit:
            component, dif, conv = hit
            return [Piece(component, dif + rest, conv1x1=conv and rest == "weight")]
    return [Piece(EXTRA, key)]


def diffusers_to_ldm(component: str, key: str, layout: Layout) -> Piece:
    """Where diffusers tensor (`component`, `key`) goes in LDM layout (``Piece.key`` is the LDM key)."""
    if component == EXTRA:
        return Piece(EXTRA, key)
    tables = _tables(layout)
    if component == "text_encoder" and key in tables.split_backward:
        ldm, index, count = tables.split_backward[key]
        return Piece(component, ldm, (index, count))
    for prefix, rest in _prefixes(key):
        hit = tables.backward.get((component, prefix))
        if hit:
            ldm, conv = hit
            return Piece(component, ldm + rest, conv1x1=conv and rest == "weight")
    raise KeyError(f"{component} key {key!r} has no LDM counterpart")


def to_diffusers_tensor(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """The diffusers tensor of `piece` cut from its LDM tensor (a view: no copy)."""
    index, count = piece.split
    if count > 1:
        tensor = tensor.chunk(count, dim=0)[index]
    if piece.conv1x1 and tensor.ndim == 4:
        tensor = tensor[:, :, 0, 0]
    return tensor


def to_ldm_tensor(tensor: torch.Tensor, piece: Piece) -> torch.Tensor:
    """Inverse of :func:`to_diffusers_tensor` for one unsplit piece."""
    if piece.conv1x1 and tensor.ndim == 2:
        tensor = tensor[:, :, None, None]
    return tensor


# --- whole-stream conversion ----------------------------------------------------------------------------

def iter_ldm_to_diffusers(items: Iterable[tuple[str, torch.Tensor]], layout: Layout
                          ) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(ldm_key, tensor) -> (component, diffusers_key, tensor), one tensor at a time."""
    for key, tensor in items:
        for piece in ldm_to_diffusers(key, layout):
            yield piece.component, piece.key, to_diffusers_tensor(tensor, piece)


def iter_diffusers_to_ldm(items: Iterable[tuple[str, str, torch.Tensor]], layout: Layout
                          ) -> Iterator[tuple[str, torch.Tensor]]:
    """(component, diffusers_key, tensor) -> (ldm_key, tensor).

    Split pieces (OpenCLIP q/k/v) are held until all parts of their LDM tensor have arrived.
    """
    pending: dict[str, dict[int, torch.Tensor]] = {}
    for component, key, tensor in items:
        piece = diffusers_to_ldm(component, key, layout)
        index, count = piece.split
        if count == 1:
            yield piece.key, to_ldm_tensor(tensor, piece)
            continue
        parts = pending.setdefault(piece.key, {})
        parts[index] = tensor
        if len(parts) == count:
            del pending[piece.key]
            yield piece.key, torch.cat([parts[i] for i in range(count)], dim=0)
    if pending:
        raise KeyError(f"incomplete split tensors: {sorted(pending)}")


def convert_ldm_state_dict(state_dict: dict[str, torch.Tensor], layout: Layout) -> dict[str, dict[str, torch.Tensor]]:
    """A whole LDM state dict -> {"unet": {...}, "vae": {...}, "text_encoder": {...}, "extra": {...}}."""
    out: dict[str, dict[str, torch.Tensor]] = {c: {} for c in (*COMPONENTS, EXTRA)}
    for component, key, tensor in iter_ldm_to_diffusers(state_dict.items(), layout):
        out[component][key] = tensor
    return out


def convert_diffusers_state_dicts(parts: dict[str, dict[str, torch.Tensor]], layout: Layout) -> dict[str, torch.Tensor]:
    """{"unet": ..., "vae": ..., "text_encoder": ..., "extra": ...} -> one LDM state dict."""
    items = ((c, k, t) for c, sd in parts.items() for k, t in sd.items())
    return dict(iter_diffusers_to_ldm(items, layout))
