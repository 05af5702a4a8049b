"""Apply hypernetworks to a model's attention layers, reversibly.

What the host does in every attention forward: ``k = to_k(hn_k(context))``, ``v = to_v(hn_v(context))``
for each loaded hypernetwork in order, wherever the context width (``context.shape[-1]``) has a module;
self-attention counts too (its context is ``x``), and ``q`` is untouched. Here that is a forward
pre-hook on each matching ``to_k`` / ``to_v`` that rewrites the projection's input. Hooks leave the
model's modules, parameters and state dict as they are, and :meth:`HypernetworkPatch.unpatch` removes
exactly the hooks it added.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from ..errors import AlchemyError
from .module import Hypernetwork, HypernetworkModule

log = logging.getLogger(__name__)

Step = tuple[HypernetworkModule, float]


def apply_chain(steps: Sequence[Step], context: torch.Tensor) -> torch.Tensor:
    """Run `context` through each (module, multiplier) in order; returns `context` itself if none acts.

    Modules with strength 0 are skipped outright so that strength 0 is bit-identical to no
    hypernetwork. The modules compute in their own dtype (float32 even under a half UNet, as in the
    host) and the result is cast back to the context's dtype.
    """
    active = [(m, mult) for m, mult in steps if m.effective_multiplier(mult) != 0]
    if not active:
        return context
    h = context
    for module, mult in active:
        weight = module.linear[0].weight
        if weight.device != h.device:  # the model was moved (offloading): follow it
            module.to(h.device)
        h = module(h.to(weight.dtype), mult)
    return h.to(context.dtype)


def _input_hook(steps: tuple[Step, ...]) -> Callable:
    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (apply_chain(steps, args[0]), *args[1:]), kwargs
        if "input" in kwargs:
            return args, {**kwargs, "input": apply_chain(steps, kwargs["input"])}
        return None
    return hook


@dataclass
class HypernetworkPatch:
    """An applied set of hypernetworks. ``unpatch()`` (or leaving the ``with`` block) removes it.

    applied: attention name -> names of the hypernetworks acting on it, in order.
    unused: (hypernetwork name, width) for every module width no attention layer of the model has.
    """

    applied: dict[str, list[str]] = field(default_factory=dict)
    unused: list[tuple[str, int]] = field(default_factory=list)
    _handles: list[RemovableHandle] = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def unpatch(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def summary(self) -> str:
        text = f"hypernetworks act on {len(self.applied)} attention layers"
        if self.unused:
            text += "; not in this model (ignored): " + ", ".join(f"{n} width {w}" for n, w in self.unused)
        return text

    def __enter__(self) -> "HypernetworkPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unpatch()


def _context_width(name: str, attn: nn.Module) -> int:
    to_k, to_v = getattr(attn, "to_k", None), getattr(attn, "to_v", None)
    if not isinstance(to_k, nn.Linear) or not isinstance(to_v, nn.Linear):
        raise AlchemyError(f"attention layer {name} has no to_k/to_v linear projections to patch",
                           fix="the model adapter must list attention modules with to_k and to_v")
    if getattr(attn, "fused_projections", False):
        raise AlchemyError(f"attention layer {name} uses fused k/v projections, which bypass to_k/to_v",
                           fix="unfuse the projections (unfuse_qkv_projections) before applying hypernetworks")
    return to_k.in_features


def apply_hypernetworks(hypernetworks: Sequence[tuple[Hypernetwork, float]],
                        attention_modules: Sequence[tuple[str, nn.Module]]) -> HypernetworkPatch:
    """Make every attention layer whose context width has a module run the hypernetworks, in order.

    hypernetworks: (hypernetwork, multiplier) pairs; each keeps its own multiplier.
    attention_modules: ``adapter.attention_modules()`` — (name, module with ``to_k``/``to_v``).
    Widths a hypernetwork has but the model lacks are listed in ``unused`` and logged, not an error
    (the host ignores them too: a 768 module simply never fires on SD2).
    """
    for hn, mult in hypernetworks:
        if not isinstance(hn, Hypernetwork):
            raise TypeError(f"expected (Hypernetwork, multiplier) pairs, got {type(hn).__name__}")
        if not math.isfinite(float(mult)):
            raise AlchemyError(f"hypernetwork {hn.name}: multiplier {mult} is not a finite number",
                               fix="use e.g. <hypernet:name:0.8>")

    patch = HypernetworkPatch()
    seen_widths = set()
    for name, attn in attention_modules:
        width = _context_width(name, attn)
        seen_widths.add(width)
        k_steps = tuple((hn.layers[width][0], float(m)) for hn, m in hypernetworks if width in hn.layers)
        if not k_steps:
            continue
        v_steps = tuple((hn.layers[width][1], float(m)) for hn, m in hypernetworks if width in hn.layers)
        device = attn.to_k.weight.device
        for module, _ in k_steps + v_steps:
            module.to(device)
        patch._handles.append(attn.to_k.register_forward_pre_hook(_input_hook(k_steps), with_kwargs=True))
        patch._handles.append(attn.to_v.register_forward_pre_hook(_input_hook(v_steps), with_kwargs=True))
        patch.applied[name] = [hn.name for hn, _ in hypernetworks if width in hn.layers]
    patch.unused = [(hn.name, size) for hn, _ in hypernetworks for size in hn.sizes if size not in seen_widths]
    if patch.unused:
        log.warning("%s", patch.summary())
    return patch
