"""Low-memory training: frozen layer weights stored in half precision, computed one layer at a time.

The big frozen tensors of a Stable Diffusion model are the weights of its Linear and Conv2d layers (SD1:
about 1 G parameters, 4 GB in float32). Low-memory training keeps each such weight in 16 bits and gives the
layer a forward that computes with it in a :class:`Precision`'s compute dtype:

- where bfloat16 arithmetic is native (:func:`bf16_supported`: a CPU with AVX512-BF16/AMX and torch >= 2.4,
  a CUDA GPU torch says supports it), the weights are stored in bfloat16 and the layers compute in bfloat16
  (:data:`BF16`): no weight is converted per call, and in the UNet the activations between layers are
  bfloat16 too, so attention and the norms run on half the bytes (the model's output is then bfloat16; the
  loss is computed in float32 from it). Measured on this machine's EPYC CPU, SD1's UNet at 256 px, forward
  and backward: 0.6x the float32 step time, 0.45x the float16-stored one;
- elsewhere they are stored in float16 and each layer casts its weight to float32 for its own call
  (:data:`FP16_STORED`), so only one layer's float32 copy exists at a time and the arithmetic is the float32
  arithmetic on the stored values.

Either way the backward pass casts again instead of keeping a converted copy, and the trained parameters,
their gradients, the optimizer state and the loss stay float32 (a layer hands the gradient back in its
input's dtype). :func:`precision_for` picks the precision for a device.

:func:`half_stored_layers` converts a float32 model in place for a block and restores the float32 tensors bit
for bit afterwards. Float16 holds the values of the usual float16 checkpoints exactly, bfloat16 does not:
with bfloat16 storage the float32 originals wait in an :class:`~.offload.Offload` (a temporary file on the
CPU, CPU RAM for an accelerator) until they are put back. :func:`load_low_memory` loads a file straight into
the low-memory form, so the loading never holds float32 copies of those weights either.
"""
from __future__ import annotations

import contextlib
import functools
import os
import platform
import types
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .offload import Offload

COMPUTE = torch.float32
"""The dtype of everything that is not a frozen layer weight (the model's inputs, norms, biases, the trained
parameters)."""


@dataclass(frozen=True)
class Precision:
    """How frozen Linear/Conv2d layers keep their weights (`storage`) and compute (`compute`)."""
    storage: torch.dtype
    compute: torch.dtype

    def describe(self) -> str:
        """For the settings file and logs, e.g. ``"weights bfloat16, compute bfloat16"``."""
        return f"weights {_name(self.storage)}, compute {_name(self.compute)}"


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


BF16 = Precision(torch.bfloat16, torch.bfloat16)
FP16_STORED = Precision(torch.float16, torch.float32)


CPU_BF16_TORCH = (2, 4)
"""Torch 2.1.2's CPU flash-attention backward in bfloat16 corrupts the heap for some head sizes (reproduced
here with 32; pytorch/pytorch#132871, reported on 2.1.2), so the CPU computes in bfloat16 only from a torch
well past it."""


def bf16_supported(device: str | torch.device) -> bool:
    """Whether `device` computes in bfloat16 natively: a CUDA GPU that torch says supports it, or a CPU on
    which oneDNN has bfloat16 kernels and that has bfloat16 instructions (AVX512-BF16 or AMX on x86; without
    them bfloat16 is emulated, slower than float32), with torch >= :data:`CPU_BF16_TORCH`."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type != "cpu" or torch.__version__ < CPU_BF16_TORCH or not torch.backends.mkldnn.is_available():
        return False
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        usable = bool(probe()) if probe is not None else False
    except RuntimeError:
        return False
    native = _x86_native_bf16()
    return usable and native is not False


def _x86_native_bf16() -> bool | None:
    """Whether an x86 CPU has bfloat16 instructions (AVX512-BF16 or AMX-BF16) by /proc/cpuinfo's flags, or
    None where that cannot be read or the CPU is no x86. oneDNN's own probe also says yes for plain AVX512,
    where it emulates bfloat16 more slowly than float32 runs."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            flags = {flag for line in fh if line.startswith("flags") for flag in line.split(":", 1)[1].split()}
    except OSError:
        return None
    return bool(flags & {"avx512_bf16", "amx_bf16"}) if flags else None


def precision_for(device: str | torch.device) -> Precision:
    """:data:`BF16` where :func:`bf16_supported`, else :data:`FP16_STORED`."""
    return BF16 if bf16_supported(device) else FP16_STORED


class _CastLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, compute: torch.dtype,
                output: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.input_dtype, ctx.compute = x.dtype, compute
        return F.linear(x.to(compute), weight.to(compute), None if bias is None else bias.to(compute)).to(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return (grad.to(ctx.compute) @ weight.to(ctx.compute)).to(ctx.input_dtype), None, None, None, None


class _CastConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, conv: nn.Conv2d, compute: torch.dtype, output: torch.dtype) -> torch.Tensor:
        ctx.conv, ctx.input_shape, ctx.input_dtype, ctx.compute = conv, x.shape, x.dtype, compute  # not x itself
        bias = None if conv.bias is None else conv.bias.to(compute)
        return conv._conv_forward(x.to(compute), conv.weight.to(compute), bias).to(output)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        conv, grad = ctx.conv, grad.to(ctx.compute)
        # The kernel reads the input only for the weight gradient, which is masked off: a shape will do.
        grad_input = torch.ops.aten.convolution_backward(
            grad, grad.new_empty(ctx.input_shape), conv.weight.to(ctx.compute), None, list(conv.stride),
            list(conv.padding), list(conv.dilation), False, [0] * len(conv.stride), conv.groups,
            [True, False, False])[0]
        return grad_input.to(ctx.input_dtype), None, None, None


# Outputs are in the compute dtype unless `keep_dtype` (then in the input's): a bfloat16 network's activations
# stay bfloat16 from layer to layer. Older diffusers also cast some inputs to the model's dtype, i.e. its first
# weight's: the layers compute in theirs whatever comes in.
def _linear_forward(self: nn.Linear, x: torch.Tensor, compute: torch.dtype, keep_dtype: bool) -> torch.Tensor:
    output = x.dtype if keep_dtype else compute
    if torch.is_grad_enabled() and x.requires_grad:
        return _CastLinear.apply(x, self.weight, self.bias, compute, output)
    bias = None if self.bias is None else self.bias.to(compute)
    return F.linear(x.to(compute), self.weight.to(compute), bias).to(output)


def _conv_forward(self: nn.Conv2d, x: torch.Tensor, compute: torch.dtype, keep_dtype: bool) -> torch.Tensor:
    output = x.dtype if keep_dtype else compute
    if torch.is_grad_enabled() and x.requires_grad and self.padding_mode == "zeros":
        return _CastConv.apply(x, self, compute, output)
    bias = None if self.bias is None else self.bias.to(compute)
    return self._conv_forward(x.to(compute), self.weight.to(compute), bias).to(output)


_FORWARDS = {nn.Linear: _linear_forward, nn.Conv2d: _conv_forward}


def _frozen_layers(root: nn.Module) -> Iterator[nn.Module]:
    """Frozen Linear/Conv2d layers whose forward nothing else replaced (:mod:`.low_res_layers` has its own)."""
    for module in root.modules():
        if type(module) in _FORWARDS and "forward" not in module.__dict__ \
                and not any(p.requires_grad for p in module.parameters()):
            yield module


def install_upcast(module: nn.Module, compute: torch.dtype = COMPUTE, keep_dtype: bool = False) -> None:
    """Give a Linear/Conv2d a forward computing in `compute` (its weight may be stored in another dtype) and
    returning `compute`, or with `keep_dtype` its input's dtype."""
    forward = functools.partial(_FORWARDS[type(module)], compute=compute, keep_dtype=keep_dtype)
    module.forward = types.MethodType(forward, module)


def remove_upcast(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)


class _Originals(nn.Module):
    """Float32 weights that bfloat16 storage cannot give back, as buffers for an :class:`Offload`, moved
    away a chunk at a time so converting never holds every float32 and bfloat16 copy at once."""

    CHUNK_BYTES = 256 * 2**20

    def __init__(self):
        super().__init__()
        self.count, self.pending = 0, 0
        self.offloads: list[Offload] = []
        self._chunk = nn.Module()

    def keep(self, weight: torch.Tensor) -> None:
        self._chunk.register_buffer(f"w{self.count}", weight.detach())
        self.count += 1
        self.pending += weight.numel() * weight.element_size()

    def move_away(self) -> None:
        """Write the weights kept since the last call out of memory (those the model no longer holds are freed)."""
        if self.pending:
            self.offloads.append(Offload(self._chunk))
            self.offloads[-1].move_away()
            self._chunk, self.pending = nn.Module(), 0

    def put_back(self) -> list[torch.Tensor]:
        """Every kept weight, in the order kept, bit for bit."""
        for offload in self.offloads:
            offload.put_back()
        return [t for offload in self.offloads for t in offload.module.buffers()] + list(self._chunk.buffers())


@contextlib.contextmanager
def half_stored_layers(root: nn.Module, precision: Precision = FP16_STORED, exact: bool = True,
                       keep_dtype: bool = False) -> Iterator[int]:
    """For the block, store the weights of `root`'s frozen float32 Linear/Conv2d layers in
    ``precision.storage`` and compute those layers in ``precision.compute`` (returning that dtype, or with
    `keep_dtype` their input's); yields how many were converted.

    Afterwards every converted weight is the same float32 tensor again and the layers have their own forward
    back. With float16 storage and `exact`, a weight whose values float16 cannot hold exactly stays float32
    (and its layer as it was). With bfloat16 storage every weight is converted and its float32 original is
    kept out of memory (:class:`Offload`) until the block ends."""
    converted: list[tuple[nn.Module, torch.Tensor]] = []
    originals = _Originals() if precision.storage == torch.bfloat16 else None
    try:
        with torch.no_grad():
            for module in _frozen_layers(root):
                weight = module.weight
                if weight.dtype != COMPUTE:
                    continue
                stored = weight.detach().to(precision.storage)
                if originals is not None:
                    originals.keep(weight)
                elif exact and not torch.equal(stored.to(COMPUTE), weight.detach()):
                    continue
                weight.data = stored
                install_upcast(module, precision.compute, keep_dtype)
                converted.append((module, weight))
                if originals is not None and originals.pending >= originals.CHUNK_BYTES:
                    originals.move_away()
            if originals is not None:
                originals.move_away()
        yield len(converted)
    finally:
        kept = originals.put_back() if originals is not None else None
        for i, (module, weight) in enumerate(converted):
            weight.data = kept[i] if kept is not None else weight.data.to(COMPUTE)
            remove_upcast(module)


def _keeps_dtype(part: str) -> bool:
    # The UNet's own code takes whatever dtype its layers hand on; the text encoder's attention multiplies a
    # layer's output with float32 probabilities (transformers' CLIP), so its layers return float32.
    return part != "unet"


def load_low_memory(path: str | os.PathLike, device: str | torch.device = "cpu",
                    precision: Precision | None = None):
    """:func:`~extensions_lib.backend.standalone.load_model` for low-memory training: every tensor in float32
    but the UNet's and text encoder's Linear/Conv2d weights, which are read from the file into float16 and
    converted one by one to ``precision.storage`` (never a float32 copy) and compute in ``precision.compute`` (default:
    :func:`precision_for` the device). The VAE encodes the training images and decodes previews: its layer
    weights are stored in float16 and compute in float32 whatever `precision`, so for float16 files the
    latents are the float32 model's. ``model.low_memory`` records the precision."""
    from ..backend.device import resolve_device
    from ..backend.standalone import load_model

    precision = precision or precision_for(resolve_device(device))
    model = load_model(path, device=device, dtype=torch.float16)    # the usual file dtype: no copy of those
    for name, module in model.modules().items():
        part_precision = FP16_STORED if name == "vae" else precision
        layers = [m for m in module.modules() if type(m) in _FORWARDS]
        half = {id(m.weight) for m in layers}
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                if tensor.is_floating_point():
                    tensor.data = tensor.data.to(part_precision.storage if id(tensor) in half else COMPUTE)
        for layer in layers:
            install_upcast(layer, part_precision.compute, _keeps_dtype(name))
    model.compute_dtype = COMPUTE
    model.low_memory = precision
    return model


def precision_in_effect(adapter) -> Precision:
    """The precision low-memory training uses on `adapter`: that of :func:`load_low_memory` for its models,
    else :func:`precision_for` the adapter's device."""
    return getattr(adapter, "low_memory", None) or precision_for(adapter.device)


@contextlib.contextmanager
def low_memory_layers(adapter, enabled: bool, precision: Precision | None = None) -> Iterator[Precision | None]:
    """:func:`half_stored_layers` (exact) over the adapter's UNet and text encoders when `enabled`, in
    `precision` (default: :func:`precision_for` the adapter's device); a model loaded by
    :func:`load_low_memory` is in that form already and stays as it is. Yields the precision in effect (that
    of :func:`load_low_memory` for its models; None when not `enabled`)."""
    if not enabled:
        yield None
        return
    precision = precision or precision_in_effect(adapter)
    with contextlib.ExitStack() as stack:
        for name, module in adapter.modules().items():
            if name != "vae":
                stack.enter_context(half_stored_layers(module, precision, keep_dtype=_keeps_dtype(name)))
        yield precision
