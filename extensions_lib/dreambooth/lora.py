"""LoRA layers on the UNet's transformer blocks and the text encoder's attention/MLP, in kohya's layout.

A LoRA adds ``up(down(x)) · alpha/rank · multiplier`` to a Linear (or 1×1 Conv2d) layer's output. Its
file (kohya, what the WebUI's built-in Lora extension reads) names each layer by its diffusers path with
'.' → '_', under ``lora_unet_`` or ``lora_te_``, with ``.lora_down.weight`` (rank, in[, 1, 1]),
``.lora_up.weight`` (out, rank[, 1, 1]) and ``.alpha`` (scalar).

:func:`attach_lora` swaps the layers for :class:`LoraLayer` wrappers and returns a :class:`LoraPatch`
whose ``remove()`` puts the very same original modules back (outputs then equal the unpatched ones
exactly). The patching of model modules for LoRA lives here only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from ..errors import AlchemyError

UNET_PREFIX = "lora_unet_"
TE_PREFIX = "lora_te_"

UNET_TARGET_BLOCKS = ("Transformer2DModel",)
"""Module classes whose Linear/1×1-conv layers get a LoRA (kohya's default for the UNet): attention
q/k/v/out, the feed-forward, proj_in/proj_out."""
TE_TARGET_BLOCKS = ("CLIPAttention", "CLIPMLP")


class LoraLayer(nn.Module):
    """`base` plus a low-rank update. The base layer is kept as is (frozen by the run set-up)."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0, multiplier: float = 1.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        while isinstance(base, LoraLayer):  # a second LoRA on the same layer stacks on the first
            base = base.base
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d) and base.kernel_size == (1, 1):
            self.down = nn.Conv2d(base.in_channels, rank, 1, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA supports Linear and 1x1 Conv2d layers, not {type(base).__name__}")
        param = base.weight
        self.down.to(param.device, torch.float32)
        self.up.to(param.device, torch.float32)
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

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base(x, *args, **kwargs)
        update = self.up(self.down(self.dropout(x.to(self.down.weight.dtype))))
        return out + (update * self.scale).to(out.dtype)


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

    layers: dict[str, LoraLayer] = field(default_factory=dict)
    _undo: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers.values() for p in (layer.down.weight, layer.up.weight)]

    def set_multiplier(self, value: float) -> None:
        for layer in self.layers.values():
            layer.multiplier = value

    def remove(self) -> None:
        while self._undo:
            root, path, original = self._undo.pop()
            _swap(root, path, original)
        self.layers.clear()

    def state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """The kohya-format tensors of every layer (`dtype`: e.g. float16 for a half file)."""
        out = {}
        for name, layer in self.layers.items():
            for part, tensor in (("lora_down.weight", layer.down.weight), ("lora_up.weight", layer.up.weight)):
                t = tensor.detach().cpu()
                out[f"{name}.{part}"] = (t.to(dtype) if dtype is not None else t).contiguous()
            out[f"{name}.alpha"] = torch.tensor(layer.alpha, dtype=dtype or torch.float32)
        return out


def attach_lora(parts: dict[str, nn.Module], rank: int, alpha: float, dropout: float = 0.0,
                seed: int = 0) -> LoraPatch:
    """Wrap the target layers of ``parts["unet"]`` (and ``parts["text_encoder"]`` when given) with new
    LoRA layers (zero update; initial down weights drawn from `seed`)."""
    patch = LoraPatch()
    generator = torch.Generator().manual_seed(seed)
    for key, prefix, blocks in (("unet", UNET_PREFIX, UNET_TARGET_BLOCKS), ("text_encoder", TE_PREFIX, TE_TARGET_BLOCKS)):
        root = parts.get(key)
        if root is None:
            continue
        for path, layer in lora_targets(root, blocks):
            wrapped = LoraLayer(layer, rank, alpha, dropout, generator=generator)
            _swap(root, path, wrapped)
            patch._undo.append((root, path, layer))
            patch.layers[kohya_name(prefix, path)] = wrapped
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
                    path: Path | None = None) -> tuple[LoraPatch, list[str]]:
    """Apply a kohya LoRA (its tensors) at `multiplier` to the layers it names; (patch, names not found).
    Layers of other kinds (conv LoRA, LoCon) are reported as not found."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, part = key.partition(".")
        groups.setdefault(name, {})[part] = tensor
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
        if found is None or "lora_down.weight" not in w or "lora_up.weight" not in w:
            missing.append(name)
            continue
        root, sub, layer = found
        down, up = w["lora_down.weight"], w["lora_up.weight"]
        rank = down.shape[0]
        try:
            wrapped = LoraLayer(layer, rank, float(w["alpha"]) if "alpha" in w else rank, multiplier=multiplier)
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
