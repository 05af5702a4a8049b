"""LoRA layers on the UNet's transformer blocks and the text encoder's attention/MLP, in kohya's layout.

A LoRA adds ``up(down(x)) · alpha/rank · multiplier`` to a Linear (or 1×1 Conv2d) layer's output. Its
file (kohya, what the WebUI's built-in Lora extension reads) names each layer by its diffusers path with
'.' → '_', under ``lora_unet_`` or ``lora_te_``, with ``.lora_down.weight`` (rank, in[, 1, 1]),
``.lora_up.weight`` (out, rank[, 1, 1]) and ``.alpha`` (scalar).

:func:`attach_lora` swaps the layers for :class:`LoraLayer` wrappers and returns a :class:`LoraPatch`
whose ``remove()`` puts the very same original modules back (outputs then equal the unpatched ones
exactly). It works on the standalone diffusers/transformers model and, inside the WebUI, on the host's
own LDM modules, named by :mod:`.lora_names` (SD2's OpenCLIP attention through
:class:`MultiheadAttentionLora`). The patching of model modules for LoRA lives here only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AlchemyError
from . import lora_names

from .lora_names import TE_PREFIX, UNET_PREFIX  # noqa: E402  (re-exported)

UNET_TARGET_BLOCKS = ("Transformer2DModel",)
"""Module classes whose Linear/1×1-conv layers get a LoRA (kohya's default for the UNet): attention
q/k/v/out, the feed-forward, proj_in/proj_out."""
TE_TARGET_BLOCKS = ("CLIPAttention", "CLIPMLP")


class LoraPart(nn.Module):
    """One kohya LoRA layer's weights: ``down`` (in → rank), ``up`` (rank → out), alpha and the multiplier;
    its update of an input is ``up(down(x)) · alpha/rank · multiplier``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, *, conv: bool = False,
                 dropout: float = 0.0, multiplier: float = 1.0, device=None, generator: torch.Generator | None = None):
        super().__init__()
        if conv:
            self.down = nn.Conv2d(in_features, rank, 1, bias=False, device=device)
            self.up = nn.Conv2d(rank, out_features, 1, bias=False, device=device)
        else:
            self.down = nn.Linear(in_features, rank, bias=False, device=device)
            self.up = nn.Linear(rank, out_features, bias=False, device=device)
        # As kohya/diffusers: down random (Kaiming uniform with a=√5: U(±1/√fan_in)), up zero, so training
        # starts at the base model. Drawn from `generator` so a seeded run starts from the same LoRA.
        bound = 1 / math.sqrt(self.down.weight[0].numel())
        with torch.no_grad():
            init = torch.rand(self.down.weight.shape, generator=generator) * 2 * bound - bound
            self.down.weight.copy_(init)
        nn.init.zeros_(self.up.weight)
        self.rank = rank
        self.alpha = float(alpha)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.multiplier = multiplier

    @property
    def scale(self) -> float:
        return self.alpha / self.rank * self.multiplier

    def update(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(self.dropout(x.to(self.down.weight.dtype)))) * self.scale

    def weight_delta(self) -> torch.Tensor:
        """The change of the (out, in) weight matrix this LoRA makes: ``up @ down · scale``."""
        up, down = self.up.weight, self.down.weight
        return (up.reshape(up.shape[0], -1) @ down.reshape(self.rank, -1)) * self.scale


def _innermost(base: nn.Module) -> nn.Module:
    while isinstance(base, LoraLayer):  # a second LoRA on the same layer stacks on the first
        base = base.base
    return base


class LoraLayer(LoraPart):
    """`base` plus a low-rank update. The base layer is kept as is (frozen by the run set-up)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, multiplier: float = 1.0,
                 generator: torch.Generator | None = None, device: torch.device | None = None):
        inner = _innermost(base)
        if isinstance(inner, nn.Linear):
            features, conv = (inner.in_features, inner.out_features), False
        elif isinstance(inner, nn.Conv2d) and inner.kernel_size == (1, 1):
            features, conv = (inner.in_channels, inner.out_channels), True
        else:
            raise TypeError(f"LoRA supports Linear and 1x1 Conv2d layers, not {type(inner).__name__}")
        super().__init__(*features, rank, alpha, conv=conv, dropout=dropout, multiplier=multiplier,
                         device=device or inner.weight.device, generator=generator)
        self.base = base

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight (code around the model reads a layer's ``weight``, e.g. for its dtype)."""
        return _innermost(self.base).weight

    @property
    def bias(self):
        return _innermost(self.base).bias

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        return out + self.update(x).to(out.dtype)


class MultiheadAttentionLora(nn.Module):
    """LoRA on an ``nn.MultiheadAttention`` (SD2's OpenCLIP text encoder): q, k, v and out each get a
    :class:`LoraPart`; the attention runs with ``in_proj_weight``/``out_proj.weight`` plus their changes,
    which is what the host computes when it merges kohya's four ``self_attn_*_proj`` layers. (LoRA dropout
    does not apply here: the change is to the weights.)"""

    def __init__(self, base: nn.MultiheadAttention, rank: int, alpha: float, generator: torch.Generator | None = None,
                 device: torch.device | None = None):
        super().__init__()
        if not base._qkv_same_embed_dim or base.in_proj_weight is None:
            raise TypeError("LoRA supports MultiheadAttention with one stacked in_proj_weight only")
        self.base = base
        width, device = base.embed_dim, device or base.in_proj_weight.device
        self.parts = nn.ModuleDict({name: LoraPart(width, width, rank, alpha, device=device, generator=generator)
                                    for name in ("q", "k", "v", "out")})

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            return super().__getattr__(name)
        except AttributeError:  # batch_first, embed_dim, in_proj_weight...: the wrapped layer's
            return getattr(super().__getattr__("base"), name)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        base = self.base
        dtype = base.in_proj_weight.dtype
        in_proj = base.in_proj_weight + torch.cat([self.parts[n].weight_delta() for n in "qkv"]).to(dtype)
        out_proj = base.out_proj.weight + self.parts["out"].weight_delta().to(dtype)
        if base.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        out, weights = F.multi_head_attention_forward(
            query, key, value, base.embed_dim, base.num_heads, in_proj, base.in_proj_bias, base.bias_k, base.bias_v,
            base.add_zero_attn, base.dropout, out_proj, base.out_proj.bias, training=base.training,
            key_padding_mask=key_padding_mask, need_weights=need_weights, attn_mask=attn_mask,
            average_attn_weights=average_attn_weights, is_causal=is_causal)
        return (out.transpose(0, 1) if base.batch_first else out), weights


def lora_targets(root: nn.Module, blocks: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """(path in `root`, layer) of every Linear / 1×1 Conv2d inside a module whose class name is in `blocks`."""
    blocks = tuple(blocks)
    out: dict[str, nn.Module] = {}
    for name, module in root.named_modules():
        if type(module).__name__ not in blocks:
            continue
        for sub, layer in module.named_modules():
            if isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1)):
                out.setdefault(f"{name}.{sub}" if name else sub, layer)
    return sorted(out.items())


def kohya_name(prefix: str, path: str) -> str:
    return prefix + path.replace(".", "_")


def _swap(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    old = getattr(parent, child) if not child.isdigit() else parent[int(child)]
    if child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return old


@dataclass
class LoraPatch:
    """Layers replaced by :class:`LoraLayer` s, by kohya name; ``remove()`` restores the originals."""

    layers: dict[str, LoraPart] = field(default_factory=dict)
    _undo: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    _weights: dict[str, tuple[nn.Parameter, nn.Parameter]] = field(default_factory=dict)
    """(down, up) of each layer as made. Kept because a host that parks a model part away from the device
    (the WebUI's --medvram) may put other tensors in the modules' places meanwhile; the parameter objects
    themselves are moved in place and are what the optimizer holds."""

    def add(self, name: str, layer: LoraPart) -> None:
        self.layers[name] = layer
        self._weights[name] = (layer.down.weight, layer.up.weight)

    def _pair(self, name: str) -> tuple[nn.Parameter, nn.Parameter]:
        layer = self.layers[name]
        return self._weights.get(name) or (layer.down.weight, layer.up.weight)

    def parameters(self) -> list[nn.Parameter]:
        return [p for name in self.layers for p in self._pair(name)]

    def set_multiplier(self, value: float) -> None:
        for layer in self.layers.values():
            layer.multiplier = value

    def remove(self) -> None:
        while self._undo:
            root, path, original = self._undo.pop()
            _swap(root, path, original)
        self.layers.clear()
        self._weights.clear()

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The kohya-format tensors of every layer (`dtype`: e.g. float16 for a half file)."""
        out = {}
        for name, layer in self.layers.items():
            for part, tensor in zip(("lora_down.weight", "lora_up.weight"), self._pair(name)):
                t = tensor.detach().cpu()
                out[f"{name}.{part}"] = (t.to(dtype) if dtype is not None else t).contiguous()
            out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=dtype or torch.float32)
        return out


def host_lora_targets(parts: dict[str, nn.Module]) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(kohya name, naming root, path in it, layer) of every layer a LoRA trains in the WebUI's own LDM
    model: ``parts["unet"]`` is ``sd_model.model``, ``parts["text_encoder"]`` its ``cond_stage_model``
    (named under ``.wrapped``, as the host's Lora extension names them; see :mod:`.lora_names`)."""
    out = []
    unet, te = parts.get("unet"), parts.get("text_encoder")
    if unet is not None:
        for path, layer in unet.named_modules():
            name = lora_names.unet_kohya_name(path)
            if name is not None and _plain_target(layer):
                out.append((name, unet, path, layer))
    if te is not None:
        root = lora_names.text_encoder_root(te)
        for path, layer in root.named_modules():
            names = lora_names.te_kohya_names(path)
            if len(names) == 1 and _plain_target(layer) or len(names) == 4 and isinstance(layer, nn.MultiheadAttention):
                out.append((names[0] if len(names) == 1 else "|".join(names), root, path, layer))
    return out


def _plain_target(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Linear) or (isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1))


def attach_lora(parts: dict[str, nn.Module], rank: int, alpha: float, dropout: float = 0.0,
                seed: int = 0, device: torch.device | None = None) -> LoraPatch:
    """Wrap the target layers of ``parts["unet"]`` (and ``parts["text_encoder"]`` when given) with new
    LoRA layers (zero update; initial down weights drawn from `seed`). The parts are a diffusers UNet and
    a transformers text encoder (standalone), or the WebUI's ``sd_model.model`` and ``cond_stage_model``
    (LDM, named as the host's Lora extension names them). device: where the LoRA weights are made (default:
    beside each layer's weight); with the WebUI's --medvram the layers may be parked away from the device
    at this moment, and the new weights then travel with their part like its own."""
    patch = LoraPatch()
    generator = torch.Generator().manual_seed(seed)
    unet = parts.get("unet")
    if unet is not None and lora_names.is_ldm_unet(unet):
        targets = host_lora_targets(parts)
    else:
        targets = [(kohya_name(prefix, path), parts[key], path, layer)
                   for key, prefix, blocks in (("unet", UNET_PREFIX, UNET_TARGET_BLOCKS),
                                               ("text_encoder", TE_PREFIX, TE_TARGET_BLOCKS))
                   if parts.get(key) is not None for path, layer in lora_targets(parts[key], blocks)]
    for name, root, path, layer in targets:
        if isinstance(layer, nn.MultiheadAttention):
            wrapped = MultiheadAttentionLora(layer, rank, alpha, generator=generator, device=device)
            for kohya, part in zip(name.split("|"), wrapped.parts.values()):
                patch.add(kohya, part)
        else:
            wrapped = LoraLayer(layer, rank, alpha, dropout, generator=generator, device=device)
            patch.add(name, wrapped)
        _swap(root, path, wrapped)
        patch._undo.append((root, path, layer))
    if not patch.layers:
        raise AlchemyError("no layer of the model can take a LoRA (no transformer block found)")
    return patch


def load_lora_file(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a kohya LoRA ``.safetensors`` (no pickles)."""
    from safetensors.torch import load_file

    if Path(path).suffix.lower() != ".safetensors":
        raise AlchemyError("only .safetensors LoRA files are read", path, fix="convert the file to .safetensors")
    try:
        return load_file(str(path))
    except Exception as exc:  # truncated or not a safetensors file
        raise AlchemyError(f"cannot read the LoRA file ({exc})", path, fix="re-download or re-train it") from None


def apply_lora_file(parts: dict[str, nn.Module], tensors: dict[str, torch.Tensor], multiplier: float,
                    path: Path | None = None, family: str = "sd1") -> tuple[LoraPatch, list[str]]:
    """Apply a kohya LoRA (its tensors) at `multiplier` to the layers it names; (patch, names not found).
    Layers of other kinds (conv LoRA, LoCon) are reported as not found. As the WebUI does: a ``scale`` part
    replaces alpha/rank, and on SD2 a text-encoder attention changes only when its q, k, v and out
    projections all come (the host merges them into one OpenCLIP attention); otherwise they are left out."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = tensor
    if family == "sd2":
        attentions: dict[str, set[str]] = {}
        for name in groups:
            stem, sep, proj = name.rpartition("_self_attn_")
            if sep and stem.startswith(TE_PREFIX):
                attentions.setdefault(stem, set()).add(proj)
        incomplete = {f"{stem}_self_attn_{p}" for stem, projs in attentions.items()
                      if projs != set(lora_names.MHA_PROJECTIONS) for p in projs}
    else:
        incomplete = set()
    layers = {}
    for key, prefix, blocks in (("unet", UNET_PREFIX, UNET_TARGET_BLOCKS), ("text_encoder", TE_PREFIX, TE_TARGET_BLOCKS)):
        root = parts.get(key)
        if root is not None:
            for sub, layer in root.named_modules():
                if isinstance(layer, (nn.Linear, nn.Conv2d, LoraLayer)) and sub and not sub.endswith(".base"):
                    layers[kohya_name(prefix, sub)] = (root, sub, layer)
    patch, missing = LoraPatch(), []
    for name, w in sorted(groups.items()):
        found = layers.get(name)
        if found is None or "lora_down.weight" not in w or "lora_up.weight" not in w or name in incomplete:
            missing.append(name)
            continue
        root, sub, layer = found
        down, up = w["lora_down.weight"], w["lora_up.weight"]
        rank = down.shape[0]
        try:
            alpha = float(w["scale"]) * rank if "scale" in w else float(w["alpha"]) if "alpha" in w else rank
            wrapped = LoraLayer(layer, rank, alpha, multiplier=multiplier)
            with torch.no_grad():
                wrapped.down.weight.copy_(down.reshape(wrapped.down.weight.shape))
                wrapped.up.weight.copy_(up.reshape(wrapped.up.weight.shape))
        except (TypeError, RuntimeError) as exc:
            raise AlchemyError(f"LoRA layer {name} does not fit this model ({exc})", path,
                               fix="use a LoRA trained for this model family") from None
        wrapped.requires_grad_(False)
        _swap(root, sub, wrapped)
        patch._undo.append((root, sub, layer))
        patch.layers[name] = wrapped
    return patch, missing


def kohya_metadata(family: str, name: str, rank: int, alpha: float) -> dict[str, str]:
    """The kohya metadata the WebUI's Lora extension reads: ``ss_output_name`` becomes the network's alias,
    and ``ss_v2``/``ss_base_model_version`` its detected SD version (the Lora page hides networks detected
    for another version than the loaded model's; any metadata without ``ss_v2 == "True"`` reads as SD1)."""
    return {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(float(alpha)),
            "ss_output_name": name, "ss_v2": str(family == "sd2"),
            "ss_base_model_version": {"sd1": "sd_v1", "sd2": "sd_v2"}.get(family, family)}
