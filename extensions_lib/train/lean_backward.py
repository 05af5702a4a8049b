"""Frozen layers that keep less for the backward pass, with bit-identical gradients.

When a network's weights are frozen and only something upstream trains (an embedding's vectors),
autograd still saves tensors its formulas need only for weight gradients or that are cheap to recompute.
Two patterns in Stable Diffusion's UNet are worth it (SD1 at 256x256: about 45 MB and 47 MB):

- a convolution's backward needs only its weight to pass the gradient on, never its input:
  :class:`FrozenConv2d` saves nothing but the input's shape and calls the same ``convolution_backward``
  kernel with the weight and bias gradients masked off, as autograd itself does for frozen weights;
- the transformer feed-forward's GEGLU (``h, g = proj(x).chunk(2); h * gelu(g)``) saves ``gelu(g)``
  besides the projection: :class:`LeanGEGLU` saves only the projection and recomputes ``gelu(g)``
  (elementwise, cheap) with the same kernels autograd would call.

:func:`lean_backward` swaps them in below a module for the duration of a block and puts the original
module objects back afterwards.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


class _FrozenConvFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        ctx.conv = conv
        ctx.input_shape = x.shape
        ctx.input_dtype = x.dtype
        # (weights may be stored in half precision and computed in x's dtype: train/low_memory.py)
        bias = None if conv.bias is None else conv.bias.to(x.dtype)
        return conv._conv_forward(x, conv.weight.to(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        conv = ctx.conv
        # The kernel wants an input tensor for its shape and layout only: with the weight and bias
        # gradients masked off it never reads it, so its memory is never touched.
        shape_only = grad.new_empty(ctx.input_shape)
        grad_input = torch.ops.aten.convolution_backward(
            grad, shape_only, conv.weight.to(grad.dtype), None, list(conv.stride), list(conv.padding),
            list(conv.dilation), False, [0] * len(conv.stride), conv.groups, [True, False, False])[0]
        return grad_input.to(ctx.input_dtype), None


class FrozenConv2d(nn.Module):
    """Runs the wrapped frozen convolution without saving its input (see the module docstring)."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (torch.is_grad_enabled() and x.requires_grad):
            return self.conv(x)
        return _FrozenConvFunction.apply(x, self.conv)


def can_freeze_conv(module: nn.Module) -> bool:
    """A plain zero-padded Conv2d with numeric padding and no parameter that trains, whose forward nothing
    replaced (:mod:`.low_res_layers` and :mod:`.low_memory` give theirs, which save nothing either)."""
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and "forward" not in module.__dict__ and not any(p.requires_grad for p in module.parameters()))


class _GegluProduct(torch.autograd.Function):
    """``h * gelu(g)`` for ``h, g = projected.chunk(2, dim=-1)``, saving only `projected`."""

    @staticmethod
    def forward(ctx, projected: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(projected)
        hidden, gate = projected.chunk(2, dim=-1)
        return hidden * F.gelu(gate)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (projected,) = ctx.saved_tensors
        hidden, gate = projected.chunk(2, dim=-1)
        grad_hidden = grad * F.gelu(gate)
        grad_gate = torch.ops.aten.gelu_backward(grad * hidden, gate)
        return torch.cat([grad_hidden, grad_gate], dim=-1)


class LeanGEGLU(nn.Module):
    """Stands in for a GEGLU module (diffusers' or ldm's: a ``proj`` Linear, then ``h * gelu(g)``)."""

    def __init__(self, geglu: nn.Module):
        super().__init__()
        self.geglu = geglu

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        projected = self.geglu.proj(hidden_states)
        if not (torch.is_grad_enabled() and projected.requires_grad) or projected.device.type == "mps":
            hidden, gate = projected.chunk(2, dim=-1)
            return hidden * self.geglu.gelu(gate) if hasattr(self.geglu, "gelu") else hidden * F.gelu(gate)
        return _GegluProduct.apply(projected)


def can_lean_geglu(module: nn.Module) -> bool:
    """A GEGLU (by class name, as diffusers and ldm both call it) with a frozen Linear projection."""
    proj = getattr(module, "proj", None)
    return (type(module).__name__ == "GEGLU" and isinstance(proj, nn.Linear)
            and not any(p.requires_grad for p in module.parameters()))


@contextlib.contextmanager
def lean_backward(root: nn.Module) -> Iterator[int]:
    """Swap frozen convolutions and GEGLUs below `root` for their lean versions for the block; yields how
    many modules were swapped."""
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for parent in list(root.modules()):
            for name, child in list(parent.named_children()):
                if can_freeze_conv(child):
                    setattr(parent, name, FrozenConv2d(child))
                elif can_lean_geglu(child):
                    setattr(parent, name, LeanGEGLU(child))
                else:
                    continue
                swapped.append((parent, name, child))
        yield len(swapped)
    finally:
        for parent, name, child in reversed(swapped):
            setattr(parent, name, child)
