"""Frozen UNet layers that see few positions: weights kept in float16 where that is exact, computed as
matrix products over row chunks.

Most of a Stable Diffusion UNet's weights sit in its lowest-resolution levels: at 256 px SD1 runs about 700
of its 860 M parameters on 64 or fewer positions (the 8x8 and 4x4 levels, and the time-embedding layers, which
see one row per image). There the layers read far more weight than they compute with, and on the CPU two
things follow, both measured on SD1's shapes (2 threads, fp32):

- oneDNN's convolution is slow on them: a 2560->1280 3x3 convolution on 4x4 positions takes 60-70 ms forward
  and as long backward, the same product written as im2col + GEMM 13 and 18 ms (1280->1280 on 8x8: 48 vs
  16 ms); at 256 positions and more the two are even, so only layers under :data:`ROWS_LIMIT` are changed
  (SD1 at 256 px, those layers' forward and backward per step: 2.28 s with oneDNN, 1.50 s from chunks);
- a weight that the checkpoint stored in float16 is held exactly by float16: keeping it so halves its memory,
  and converting one chunk of rows at a time to float32 right before its product costs little next to the
  product (GEMM on float32 chunks that stay in cache) and never holds a float32 copy of the whole weight.

:func:`low_res_layers` finds the layers by running the UNet once at two small sizes with every frozen
Linear/Conv2d stubbed out (the rows each one sees, scaled to the training size and batch), stores the
weights of those under the limit in float16 where the round trip is exact (others stay float32), and gives
each a forward computing in float32 from chunks. Like :mod:`.lean_backward` the backward pass needs only the
weight, so nothing is saved for it. Results equal the float32 layers' up to summation order. Leaving the block
puts the float32 weights and the layers' own forwards back (bit for bit). The command line, which does not
use the model afterwards, reads those weights from the file straight into this form
(:func:`load_for_training`): no float32 copy of them exists at any point.
"""
from __future__ import annotations

import contextlib
import types
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

ROWS_LIMIT = 64
"""Layers whose matrix product has at most this many rows (positions x batch) at the training size."""
CHUNK_BYTES = 4 * 2**20
"""Float32 bytes of one weight chunk: fits the cache next to its product."""
STORED = torch.float16
COMPUTE = torch.float32


def _chunks(weight2d: torch.Tensor) -> Iterator[tuple[int, torch.Tensor]]:
    """(first row, rows in float32) over a 2-D weight: the weight itself if it is float32 already."""
    if weight2d.dtype == COMPUTE:
        yield 0, weight2d
        return
    step = max(1, CHUNK_BYTES // (weight2d.shape[1] * 4))
    for start in range(0, weight2d.shape[0], step):
        yield start, weight2d[start:start + step].to(COMPUTE)


def _conv_geometry(conv: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1


def conv_rows(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` in float32 as im2col + GEMM over weight-row chunks."""
    batch, _, height, width = x.shape
    out_h, out_w = _conv_geometry(conv, height, width)
    positions = out_h * out_w
    cols = F.unfold(x, conv.kernel_size, padding=conv.padding, stride=conv.stride)      # (B, K, L)
    inner = cols.shape[1]
    cols = cols[0] if batch == 1 else cols.transpose(0, 1).reshape(inner, batch * positions)
    weight = conv.weight.reshape(conv.out_channels, inner)
    out = x.new_empty(conv.out_channels, batch * positions)
    for start, rows in _chunks(weight):
        torch.mm(rows, cols, out=out[start:start + rows.shape[0]])
    if conv.bias is not None:
        out += conv.bias.to(COMPUTE)[:, None]
    if batch == 1:
        return out.view(1, conv.out_channels, out_h, out_w)
    return out.view(conv.out_channels, batch, positions).transpose(0, 1).reshape(batch, conv.out_channels, out_h, out_w)


def conv_rows_backward(conv: nn.Conv2d, grad: torch.Tensor, input_shape: torch.Size) -> torch.Tensor:
    """The gradient of :func:`conv_rows` for its input (the weight is frozen): col2im of W^T @ grad."""
    batch, _, height, width = input_shape
    positions = grad.shape[2] * grad.shape[3]
    weight = conv.weight.reshape(conv.out_channels, -1)
    grad = grad.reshape(conv.out_channels, positions) if batch == 1 else \
        grad.reshape(batch, conv.out_channels, positions).transpose(0, 1).reshape(conv.out_channels, batch * positions)
    cols = grad.new_zeros(weight.shape[1], batch * positions)
    for start, rows in _chunks(weight):
        cols.addmm_(rows.t(), grad[start:start + rows.shape[0]])
    cols = cols[None] if batch == 1 else cols.view(-1, batch, positions).transpose(0, 1)
    return F.fold(cols, (height, width), conv.kernel_size, padding=conv.padding, stride=conv.stride)


def linear_rows(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` in float32 over weight-row chunks."""
    flat = x.reshape(-1, linear.in_features)
    out = x.new_empty(flat.shape[0], linear.out_features)
    for start, rows in _chunks(linear.weight):
        torch.mm(flat, rows.t(), out=out[:, start:start + rows.shape[0]])
    if linear.bias is not None:
        out += linear.bias.to(COMPUTE)
    return out.view(*x.shape[:-1], linear.out_features)


def linear_rows_backward(linear: nn.Linear, grad: torch.Tensor) -> torch.Tensor:
    flat = grad.reshape(-1, linear.out_features)
    out = grad.new_zeros(flat.shape[0], linear.in_features)
    for start, rows in _chunks(linear.weight):
        out.addmm_(flat[:, start:start + rows.shape[0]], rows)
    return out.view(*grad.shape[:-1], linear.in_features)


class _RowsFunction(torch.autograd.Function):
    """Keeps nothing for backward but the layer and the input's shape and dtype."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer, ctx.input_shape, ctx.input_dtype = layer, x.shape, x.dtype
        return _compute(layer, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer, grad = ctx.layer, grad.to(COMPUTE).contiguous()
        if isinstance(layer, nn.Conv2d):
            return conv_rows_backward(layer, grad, ctx.input_shape).to(ctx.input_dtype), None
        return linear_rows_backward(layer, grad).to(ctx.input_dtype), None


def _compute(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    # Float32 whatever comes in, as low_memory's layers do: a model whose first weight is 16-bit (diffusers
    # then casts the time embedding to it) still computes in float32.
    x = x.to(COMPUTE)
    return conv_rows(layer, x) if isinstance(layer, nn.Conv2d) else linear_rows(layer, x)


def _rows_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.device.type != "cpu":      # not what this path is for: the layer's own arithmetic in x's dtype
        weight = self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return self._conv_forward(x, weight, bias) if isinstance(self, nn.Conv2d) else F.linear(x, weight, bias)
    if torch.is_grad_enabled() and x.requires_grad:
        return _RowsFunction.apply(x, self)
    return _compute(self, x)


def can_compute_in_rows(module: nn.Module) -> bool:
    """A frozen plain Linear, or a frozen Conv2d with numeric zero padding, no dilation and one group, whose
    weight is float32 or float16."""
    if any(p.requires_grad for p in module.parameters()) or \
            getattr(module, "weight", None) is None or module.weight.dtype not in (COMPUTE, STORED):
        return False
    if type(module) is nn.Linear:
        return True
    return (type(module) is nn.Conv2d and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and module.groups == 1 and all(d == 1 for d in module.dilation))


# ---- which layers see few rows --------------------------------------------------------------------------------

def _probe(unet: nn.Module, run: Callable[[int], object], size: int) -> dict[nn.Module, int]:
    """Rows each frozen Linear/Conv2d of `unet` multiplies for a `size` x `size` latent, batch 1, found with
    every such layer stubbed to zeros of its output's shape (no weight is read)."""
    rows: dict[nn.Module, int] = {}
    stubbed: list[tuple[nn.Module, object]] = []

    def stub(self, x, *args, **kwargs):
        if isinstance(self, nn.Conv2d):
            out_h, out_w = _conv_geometry(self, x.shape[-2], x.shape[-1])
            rows[self] = max(rows.get(self, 0), x.shape[0] * out_h * out_w)
            return x.new_zeros(x.shape[0], self.out_channels, out_h, out_w)
        rows[self] = max(rows.get(self, 0), x.numel() // self.in_features)
        return x.new_zeros(*x.shape[:-1], self.out_features)

    for module in unet.modules():
        if type(module) in (nn.Linear, nn.Conv2d) and not isinstance(getattr(module, "padding", 0), str):
            stubbed.append((module, module.__dict__.get("forward")))
            module.forward = types.MethodType(stub, module)
    try:
        with torch.no_grad():
            run(size)
    finally:
        for module, forward in stubbed:
            _restore_forward(module, forward)
    return rows


def _restore_forward(module: nn.Module, forward: object) -> None:
    """Give `module` back the instance forward it had (None: its class's)."""
    if forward is None:
        module.__dict__.pop("forward", None)
    else:
        module.forward = forward


def training_rows(unet: nn.Module, run: Callable[[int], object], latent_hw: tuple[int, int],
                  batch: int) -> dict[nn.Module, int]:
    """Rows each frozen Linear/Conv2d multiplies at the training size: a latent of `latent_hw`, `batch` images.
    `run(size)` calls the UNet on a batch of one ``size`` x ``size`` latent. Layers whose rows grow with the
    latent (the image's positions) are scaled from a probe at 8x8; the rest (time embedding, text context)
    keep theirs."""
    small, large = _probe(unet, run, 8), _probe(unet, run, 16)
    scale = latent_hw[0] * latent_hw[1] / 64
    return {m: batch * int(round(n * scale if large.get(m, n) > n else n)) for m, n in small.items()}


def unet_runner(adapter) -> Callable[[int], object]:
    """`run(size)` for :func:`training_rows`: the adapter's UNet on a zero latent and a zero text context."""
    channels = next(m for m in adapter.modules()["unet"].modules() if isinstance(m, nn.Conv2d)).in_channels

    def run(size: int):
        return adapter.predict(torch.zeros(1, channels, size, size), torch.tensor([500]),
                               torch.zeros(1, 77, adapter.context_dim))
    return run


def _uses_rows(module: nn.Module) -> bool:
    forward = module.__dict__.get("forward")
    return getattr(forward, "__func__", None) is _rows_forward


def load_for_training(path, device="cpu", latent_hw: tuple[int, int] = (64, 64), batch: int = 1,
                      limit: int = ROWS_LIMIT):
    """:func:`~extensions_lib.backend.standalone.load_model` for training on the CPU in float32, as the
    command line loads a model it does not use afterwards: UNet layers that multiply at most `limit` rows at the
    training size are read straight into the form :func:`low_res_layers` gives them (their float16 weights
    from the file kept, computing from row chunks), so no float32 copy of them is ever made; the other UNet
    layers are float32 as usual. Elsewhere (another device, a float32 file) the same as ``load_model``."""
    from ..backend.standalone import load_model
    from .cpu_memory import release_free_memory
    from .low_memory import remove_upcast

    model = load_model(path, device=device, half_unet_layers=True)
    unet = model.unet
    half = [m for m in unet.modules() if type(m) in (nn.Linear, nn.Conv2d) and m.weight.dtype == STORED]
    if not half:
        return model
    rows = training_rows(unet, unet_runner(model), latent_hw, batch)
    with torch.no_grad():
        for module in half:     # (never the first parameter's layer: load_model keeps that float32)
            remove_upcast(module)       # load_model's per-call upcast
            if rows.get(module, limit + 1) <= limit and can_compute_in_rows(module):
                module.forward = types.MethodType(_rows_forward, module)
            else:
                module.weight.data = module.weight.data.to(COMPUTE)
    release_free_memory()
    return model


# ---- the block ------------------------------------------------------------------------------------------------

@dataclass
class LowResReport:
    layers: int = 0
    """Layers computing from row chunks."""
    stored_half: int = 0
    """Of those, how many hold their weight in float16 now."""
    bytes_saved: int = 0
    """Memory freed by storing float32 weights in float16."""


@contextlib.contextmanager
def low_res_layers(unet: nn.Module, rows: dict[nn.Module, int], limit: int = ROWS_LIMIT) -> Iterator[LowResReport]:
    """For the block, the frozen layers of `unet` that multiply at most `limit` `rows` at the training size
    (:func:`training_rows`) compute from row chunks, with their float32 weights stored in float16 where that
    is exact (see the module docstring). Yields a :class:`LowResReport`. Afterwards the weights are float32
    again, bit for bit, and the layers have their previous forward."""
    first = next(unet.parameters(), None)      # diffusers takes the model's dtype from its first parameter
    report = LowResReport()
    changed: list[tuple[nn.Module, object, bool]] = []     # (layer, its previous forward, weight converted here)
    try:
        with torch.no_grad():
            for module, count in rows.items():
                if count > limit or not can_compute_in_rows(module) or module.weight is first or _uses_rows(module):
                    continue
                weight, converted = module.weight, False
                if weight.dtype == COMPUTE:
                    half = weight.detach().to(STORED)
                    if torch.equal(half.to(COMPUTE), weight.detach()):
                        weight.data, converted = half, True        # the float32 copy is freed here
                        report.bytes_saved += half.numel() * half.element_size()
                    elif isinstance(module, nn.Linear):
                        continue                                    # a float32 Linear gains nothing from chunks
                report.stored_half += weight.dtype == STORED
                changed.append((module, module.__dict__.get("forward"), converted))
                module.forward = types.MethodType(_rows_forward, module)
        report.layers = len(changed)
        yield report
    finally:
        with torch.no_grad():
            for module, forward, converted in reversed(changed):
                _restore_forward(module, forward)
                if converted:
                    module.weight.data = module.weight.data.to(COMPUTE)     # exact: checked when stored
