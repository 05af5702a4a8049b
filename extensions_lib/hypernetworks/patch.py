"""Apply hypernetworks to a model's attention layers, reversibly.

What the host does in every attention forward: ``k = to_k(hn_k(context))``, ``v = to_v(hn_v(context))``
for each loaded hypernetwork in order, wherever the context width (``context.shape[-1]``) has a module;
self-attention counts too (its context is ``x``), and ``q`` is untouched.

Here each matching ``to_k`` / ``to_v`` gets an instance-level ``forward`` (a :class:`_PatchedProjection`);
the module objects, their parameters, hooks and the state dict stay as they are, and
:meth:`HypernetworkPatch.unpatch` deletes that attribute again, so the class's own forward runs as before.
Two ways to compute the same thing, chosen per call:

- **Folded**: a chain of affine modules (activation "linear", the WebUI default, and no layer norm; dropout
  is the identity in eval mode) is ``x + m (A x + c)``, so ``to_k(hn(x)) = W (I + m A) x + W m c + b``: one
  Linear of the projection's own size. The folded weight is computed on first use and again whenever a
  hypernetwork parameter, the projection's weights (their version counter or storage) or a multiplier
  change. Never while a hypernetwork trains or gradients must reach a parameter: those need the real graph.
- **Hooked**: otherwise the chain runs on the context and the projection runs on its output. The chain's
  output for the last context it saw is kept (one entry per chain, the context held so its identity cannot
  be reused), so the cross-attention layers of one width share one computation per forward.
"""
from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import AlchemyError
from .module import Hypernetwork, HypernetworkModule

log = logging.getLogger(__name__)

Step = tuple[HypernetworkModule, float]

_AFFINE_LAYERS = (nn.Linear, nn.Identity, nn.Dropout)  # Dropout: the identity unless training, which never folds


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


def _tensor_state(t: torch.Tensor | None) -> tuple | None:
    """What changes when a tensor's values may have changed: in-place writes bump the version, a move or
    ``.data =`` changes the storage. None when torch keeps no version (inference-mode tensors)."""
    if t is None:
        return ()
    try:
        return id(t), t._version, t.data_ptr(), t.device, t.dtype, tuple(t.shape)
    except RuntimeError:
        return None


def _needs_graph(tensors: Sequence[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _Chain:
    """The modules of the patch's hypernetworks for one width and one of k/v, in order, with their caches."""

    def __init__(self, steps: tuple[Step, ...]):
        self.steps = steps
        self.affine = all(type(layer) in _AFFINE_LAYERS for m, _ in steps for layer in m.linear)
        self._last: tuple | None = None  # (context, key, output) of the last hooked call
        self._maps: dict[int, tuple] = {}  # id(module) -> (state, device, A, c)

    def active(self) -> list[tuple[HypernetworkModule, float]]:
        return [(m, m.effective_multiplier(mult)) for m, mult in self.steps if m.effective_multiplier(mult) != 0]

    def parameters(self) -> list[torch.Tensor]:
        return [p for m, _ in self.steps for p in m.parameters()]

    def state(self) -> tuple | None:
        """Key for everything the chain's output depends on besides its input; None: do not cache."""
        if any(m.training for m, _ in self.steps):
            return None  # dropout draws anew at every call, and the host ignores multipliers while training
        states = tuple(_tensor_state(p) for p in self.parameters())
        if any(s is None for s in states):
            return None
        return tuple(mult for _, mult in self.active()), states

    def foldable(self) -> bool:
        return self.affine and not _needs_graph(self.parameters()) and not any(m.training for m, _ in self.steps)

    def apply(self, context: torch.Tensor) -> torch.Tensor:
        """`apply_chain` on `context`, reusing the last result for the same, unchanged context tensor."""
        state = self.state()
        if state is None or _needs_graph([context, *self.parameters()]):
            self._last = None
            return apply_chain(self.steps, context)
        ctx_state = _tensor_state(context)
        key = (ctx_state, state, torch.is_inference_mode_enabled())
        last = self._last
        if ctx_state is not None and last is not None and last[0] is context and last[1] == key:
            return last[2]
        output = apply_chain(self.steps, context)
        self._last = (context, key, output) if ctx_state is not None else None
        return output

    def affine_map(self, module: HypernetworkModule, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(A, c) in float32 with ``module.linear(x) = A x + c``; composed once per module state and device."""
        state = tuple(_tensor_state(p) for p in module.parameters())
        cached = self._maps.get(id(module))
        if cached is not None and cached[0] == state and cached[1] == device:
            return cached[2], cached[3]
        a = c = None
        with torch.no_grad():
            for layer in module.linear:
                if isinstance(layer, nn.Linear):
                    w = layer.weight.detach().to(device, torch.float32)
                    b = layer.bias.detach().to(device, torch.float32)
                    a = w if a is None else w @ a
                    c = b if c is None else w @ c + b
        self._maps[id(module)] = (state, device, a, c)
        return a, c

    def clear(self) -> None:
        self._last = None
        self._maps.clear()


def _is_plain_linear_forward(proj: nn.Module) -> bool:
    # Only torch's own Linear.forward may be replaced by F.linear on folded weights: a subclass or a
    # class-level replacement (e.g. a LoRA extension's Linear.forward) must still run on the hooked input.
    forward = getattr(type(proj), "forward", None)
    return (getattr(forward, "__module__", None) == "torch.nn.modules.linear"
            and getattr(forward, "__qualname__", None) == "Linear.forward")


class _PatchedProjection:
    """The instance ``forward`` of a patched ``to_k``/``to_v``: every chain registered on it, in order."""

    def __init__(self, proj: nn.Linear, base: Any):
        self._proj = weakref.ref(proj)  # no reference cycle through proj.__dict__
        self.base = base  # an instance forward that was there before us (kept and called), or None
        self.chains: list[tuple[object, _Chain]] = []
        self._folded: tuple | None = None  # (key, weight, bias)

    def _forward_unpatched(self, proj: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) if self.base is not None else type(proj).forward(proj, x)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        proj = self._proj()
        x = args[0] if args else kwargs["input"]  # Linear.forward takes just `input`
        chains = [chain for _, chain in self.chains]
        if not any(chain.active() for chain in chains):
            self._folded = None
            return self._forward_unpatched(proj, x)
        folded = self._fold(proj, chains)
        if folded is not None:
            return F.linear(x, *folded)
        for chain in chains:
            x = chain.apply(x)
        return self._forward_unpatched(proj, x)

    def _fold(self, proj: nn.Linear, chains: list[_Chain]) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(weight, bias) of ``proj`` after the chains, or None when this call must run them for real."""
        if (self.base is not None or not _is_plain_linear_forward(proj) or not all(c.foldable() for c in chains)
                or _needs_graph([proj.weight, proj.bias])):
            self._folded = None
            return None
        states = tuple(c.state() for c in chains)
        proj_state = (_tensor_state(proj.weight), _tensor_state(proj.bias))
        if any(s is None for s in states) or None in proj_state:
            self._folded = None
            return None
        key = (states, proj_state, torch.is_inference_mode_enabled())  # inference tensors must stay inside it
        if self._folded is not None and self._folded[0] == key:
            return self._folded[1:]
        self._folded = None  # free the old fold before building the new one
        weight, bias = fold_into_linear(proj, [(c, step) for c in chains for step in c.active()])
        self._folded = (key, weight, bias)
        return weight, bias


@torch.no_grad()
def fold_into_linear(proj: nn.Linear, steps: Sequence[tuple[_Chain, tuple[HypernetworkModule, float]]]
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Weight and bias of ``proj(step_n(...step_1(x)))`` for affine steps, in the projection's dtype.

    Going backwards from ``(G, g) = (W, b)``: a step ``x + m (A x + c)`` turns ``G y + g`` into
    ``(G + m G A) x + (g + m G c)``. Computed in float32; a bias is made only where one is non-zero.
    """
    device = proj.weight.device
    g_w = proj.weight.detach().to(torch.float32)
    g_b = proj.bias.detach().to(torch.float32) if proj.bias is not None else None
    for chain, (module, mult) in reversed(steps):
        a, c = chain.affine_map(module, device)
        if c.is_meta or torch.count_nonzero(c):  # meta: values unknown, keep the bias
            shift = mult * (g_w @ c)
            g_b = shift if g_b is None else g_b + shift
        g_w = g_w + mult * (g_w @ a)
    dtype = proj.weight.dtype
    return g_w.to(dtype).contiguous(), (g_b.to(dtype) if g_b is not None else None)


def _install(proj: nn.Linear) -> _PatchedProjection:
    current = proj.__dict__.get("forward")
    if isinstance(current, _PatchedProjection):
        return current
    patched = _PatchedProjection(proj, current)
    proj.forward = patched
    return patched


def _uninstall(proj: nn.Linear, patched: _PatchedProjection) -> None:
    if patched.chains or proj.__dict__.get("forward") is not patched:
        return  # another patch still uses it, or someone wrapped us since (we then pass through)
    if patched.base is None:
        del proj.__dict__["forward"]
    else:
        proj.forward = patched.base


@dataclass
class HypernetworkPatch:
    """An applied set of hypernetworks. ``unpatch()`` (or leaving the ``with`` block) removes it.

    applied: attention name -> names of the hypernetworks acting on it, in order.
    unused: (hypernetwork name, width) for every module width no attention layer of the model has.
    """

    applied: dict[str, list[str]] = field(default_factory=dict)
    unused: list[tuple[str, int]] = field(default_factory=list)
    _entries: list[tuple[nn.Linear, _PatchedProjection, _Chain]] = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        return bool(self._entries)

    def unpatch(self) -> None:
        for proj, patched, chain in self._entries:
            patched.chains[:] = [(owner, c) for owner, c in patched.chains if owner is not self]
            patched._folded = None
            chain.clear()
            _uninstall(proj, patched)
        self._entries.clear()

    def summary(self) -> str:
        text = f"hypernetworks act on {len(self.applied)} attention layers"
        if self.unused:
            text += "; not in this model (ignored): " + ", ".join(f"{n} width {w}" for n, w in self.unused)
        return text

    def __enter__(self) -> "HypernetworkPatch":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.unpatch()

    def _add(self, proj: nn.Linear, chain: _Chain) -> None:
        patched = _install(proj)
        patched.chains.append((self, chain))
        patched._folded = None
        self._entries.append((proj, patched, chain))


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

    hypernetworks: (hypernetwork, multiplier) pairs; each keeps its own multiplier (to change one, unpatch
    and apply again).
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
    chains: dict[int, tuple[_Chain, _Chain]] = {}  # per width, shared by its layers (and their caches)
    seen_widths = set()
    for name, attn in attention_modules:
        width = _context_width(name, attn)
        seen_widths.add(width)
        if width not in chains:
            k_steps = tuple((hn.layers[width][0], float(m)) for hn, m in hypernetworks if width in hn.layers)
            v_steps = tuple((hn.layers[width][1], float(m)) for hn, m in hypernetworks if width in hn.layers)
            chains[width] = (_Chain(k_steps), _Chain(v_steps))
        k_chain, v_chain = chains[width]
        if not k_chain.steps:
            continue
        device = attn.to_k.weight.device
        for module, _ in k_chain.steps + v_chain.steps:
            module.to(device)
        patch._add(attn.to_k, k_chain)
        patch._add(attn.to_v, v_chain)
        patch.applied[name] = [hn.name for hn, _ in hypernetworks if width in hn.layers]
    patch.unused = [(hn.name, size) for hn, _ in hypernetworks for size in hn.sizes if size not in seen_widths]
    if patch.unused:
        log.warning("%s", patch.summary())
    return patch
