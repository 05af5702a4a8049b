"""Low-memory training: frozen layer weights stored in half precision, computed in float32 one layer at a time.

The big frozen tensors of a Stable Diffusion model are the weights of its Linear and Conv2d layers (SD1:
about 1 G parameters, 4 GB in float32). :func:`half_stored_layers` keeps each such weight in float16 (or
bfloat16) and gives the layer a forward that casts it to float32 just for its own call, so at any time only
one layer's float32 copy exists; the backward pass casts again instead of keeping the float32 copy alive.
Inputs, outputs, norms, biases, trained parameters and the optimizer stay in float32, so the arithmetic is the
float32 arithmetic on the stored (half-precision) weight values.

Storing loses nothing when the values are exactly representable, as in the usual float16 checkpoints:
:func:`half_stored_layers` converts only such weights unless told to round (``exact=False``), and putting
them back restores the float32 tensors bit for bit. :func:`load_low_memory` loads a file straight into this
form, so the loading never holds float32 copies of those weights either.
"""
from __future__ import annotations

import contextlib
import os
import types
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

COMPUTE = torch.float32


class _UpcastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.input_dtype = x.dtype
        return F.linear(x.to(COMPUTE), weight.to(COMPUTE), None if bias is None else bias.to(COMPUTE))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return (grad.to(COMPUTE) @ weight.to(COMPUTE)).to(ctx.input_dtype), None, None


class _UpcastConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
        ctx.conv, ctx.input_shape, ctx.input_dtype = conv, x.shape, x.dtype   # the input itself is not needed
        bias = None if conv.bias is None else conv.bias.to(COMPUTE)
        return conv._conv_forward(x.to(COMPUTE), conv.weight.to(COMPUTE), bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        conv, grad = ctx.conv, grad.to(COMPUTE)
        grad_input = torch.ops.aten.convolution_backward(
            grad, grad.new_empty(ctx.input_shape), conv.weight.to(COMPUTE), None, list(conv.stride),
            list(conv.padding), list(conv.dilation), False, [0] * len(conv.stride), conv.groups,
            [True, False, False])[0]
        return grad_input.to(ctx.input_dtype), None


# Older diffusers cast some inputs to the model's dtype, i.e. its first weight's (float16 here): the layers
# compute in float32 whatever comes in, which loses nothing.
def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _UpcastLinear.apply(x, self.weight, self.bias)
    return F.linear(x.to(COMPUTE), self.weight.to(COMPUTE), None if self.bias is None else self.bias.to(COMPUTE))


def _conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad and self.padding_mode == "zeros":
        return _UpcastConv.apply(x, self)
    bias = None if self.bias is None else self.bias.to(COMPUTE)
    return self._conv_forward(x.to(COMPUTE), self.weight.to(COMPUTE), bias)


_FORWARDS = {nn.Linear: _linear_forward, nn.Conv2d: _conv_forward}


def _frozen_layers(root: nn.Module) -> Iterator[nn.Module]:
    for module in root.modules():
        if type(module) in _FORWARDS and not any(p.requires_grad for p in module.parameters()):
            yield module


def install_upcast(module: nn.Module) -> None:
    """Give a Linear/Conv2d the float32-computing forward (its weight may already be half precision)."""
    module.forward = types.MethodType(_FORWARDS[type(module)], module)


def remove_upcast(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)


@contextlib.contextmanager
def half_stored_layers(root: nn.Module, storage: torch.dtype = torch.float16, exact: bool = True) -> Iterator[int]:
    """For the block, store the weights of `root`'s frozen float32 Linear/Conv2d layers in `storage` and
    compute those layers in float32; yields how many were converted. With `exact`, a weight whose values
    `storage` cannot hold exactly stays float32. Afterwards every converted weight is float32 again (the
    same values when exact) and the layers have their own forward back."""
    converted: list[tuple[nn.Module, torch.Tensor]] = []
    try:
        for module in _frozen_layers(root):
            weight = module.weight
            if weight.dtype != COMPUTE:
                continue
            stored = weight.detach().to(storage)
            if exact and not torch.equal(stored.to(COMPUTE), weight.detach()):
                continue
            weight.data = stored
            install_upcast(module)
            converted.append((module, weight))
        yield len(converted)
    finally:
        for module, weight in converted:
            weight.data = weight.data.to(COMPUTE)
            remove_upcast(module)


def load_low_memory(path: str | os.PathLike, device: str | torch.device = "cpu",
                    storage: torch.dtype = torch.float16):
    """:func:`~extensions_lib.backend.standalone.load_model` for low-memory training: every tensor in float32
    but the Linear/Conv2d weights, which stay in `storage` (read from the file without a float32 copy) and
    compute in float32 layer by layer."""
    from ..backend.standalone import load_model

    model = load_model(path, device=device, dtype=storage)
    for module in model.modules().values():
        half = {id(m.weight) for m in module.modules() if type(m) in _FORWARDS}
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.is_floating_point() and id(tensor) not in half:
                tensor.data = tensor.data.to(COMPUTE)
        for layer in module.modules():
            if type(layer) in _FORWARDS:
                install_upcast(layer)
    model.compute_dtype = COMPUTE
    return model


@contextlib.contextmanager
def low_memory_layers(adapter, enabled: bool) -> Iterator[None]:
    """:func:`half_stored_layers` (exact) over the adapter's UNet and text encoders when `enabled`; a model
    loaded by :func:`load_low_memory` is in that form already and stays as it is."""
    with contextlib.ExitStack() as stack:
        if enabled:
            for name, module in adapter.modules().items():
                if name != "vae":
                    stack.enter_context(half_stored_layers(module))
        yield
