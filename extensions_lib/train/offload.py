"""Keeping frozen tensors out of memory while a training run does not need them, and putting them back exactly.

Textual inversion needs the VAE only to encode the training images (once, before the first step) and
to decode previews, and it reads only a few dozen rows of the text encoder's token-embedding matrix;
the rest is dead weight during training (half a GB for SD1). :class:`Offload` moves a module's tensors
away, the way the WebUI's "Move VAE and CLIP to RAM when training" does, with a CPU-only fallback:

- tensors on an accelerator go to CPU RAM;
- tensors already in CPU RAM go to a temporary file, written one tensor at a time, and the module holds
  empty tensors (no memory; using the module meanwhile fails loudly on the shapes).

The module keeps its Parameter objects throughout (only their data is swapped), and putting it back
gives bit-identical values on the original devices. An offload can go back and forth any number of
times (previews in the middle of a run), and single rows can be read while it is away
(:meth:`Offload.read_rows`, for :class:`~.token_rows.TokenRows`).
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import nn

Location = tuple[int, torch.dtype, tuple[int, ...]]
"""(byte offset in the file, dtype, shape) of one stored tensor."""


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of `module` by qualified name (shared ones once)."""
    found: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            found[name] = tensor
    return found


def _nbytes(dtype: torch.dtype, shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=dtype).element_size()


class Offload:
    """One module's tensors, either in place (``present``) or away; see the module docstring."""

    def __init__(self, module: nn.Module, directory: str | Path | None = None):
        self.module = module
        self._directory = directory
        self._file: Path | None = None
        self._stored: dict[str, Location] = {}
        self._homes: dict[str, torch.device] = {}
        self.present = True

    def move_away(self) -> None:
        if not self.present:
            return
        tensors = _tensors(self.module)
        self._homes = {name: t.device for name, t in tensors.items()}
        with torch.no_grad():
            on_cpu = {name: t for name, t in tensors.items() if t.device.type == "cpu"}
            for name, t in tensors.items():
                if name not in on_cpu:
                    t.data = t.data.to("cpu")
            if on_cpu:
                self._write(on_cpu)
        self.present = False

    def put_back(self) -> None:
        if self.present:
            return
        tensors = _tensors(self.module)
        with torch.no_grad():
            for name, location in self._stored.items():
                tensors[name].data = self._read(*location)
            for name, device in self._homes.items():
                if tensors[name].device != device:
                    tensors[name].data = tensors[name].data.to(device)
        self._remove_file()
        self.present = True

    def read_rows(self, name: str, rows: list[int]) -> torch.Tensor:
        """Rows (along the first dimension) of tensor `name` while the module is away."""
        if self.present:
            raise RuntimeError("read_rows is for a module that is away; read the module itself")
        if name not in self._stored:  # moved to CPU RAM: the tensor itself still holds the values
            return _tensors(self.module)[name].detach()[rows].to(self._homes[name])
        offset, dtype, shape = self._stored[name]
        row_bytes = _nbytes(dtype, shape[1:])
        return torch.stack([self._read(offset + r * row_bytes, dtype, shape[1:]) for r in rows]).to(self._homes[name])

    @contextlib.contextmanager
    def present_for(self) -> Iterator[None]:
        """Put the module back for the block (e.g. a preview), then move it away again if it was away."""
        was_away = not self.present
        self.put_back()
        try:
            yield
        finally:
            if was_away:
                self.move_away()

    # --- the file --------------------------------------------------------------------------------------
    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        # One tensor at a time, each freed as soon as it is on disk: a serializer that builds the whole
        # file in memory first would need the module's size again just when we are freeing it.
        folder = Path(tempfile.mkdtemp(prefix="alchemy-offload-", dir=self._directory))
        self._file = folder / "tensors.bin"
        offset = 0
        with open(self._file, "wb") as fh:
            for name, t in tensors.items():
                data = t.detach().contiguous().reshape(-1).view(torch.uint8)
                data.numpy().tofile(fh)
                self._stored[name] = (offset, t.dtype, tuple(t.shape))
                offset += data.numel()
                del data
                t.data = torch.empty(0, dtype=t.dtype)  # keeps the Parameter object (set_data keeps device type)

    def _read(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        raw = np.fromfile(self._file, dtype=np.uint8, count=_nbytes(dtype, shape), offset=offset)
        return torch.from_numpy(raw).view(dtype).reshape(shape)

    def _remove_file(self) -> None:
        if self._file is not None:
            shutil.rmtree(self._file.parent, ignore_errors=True)
        self._file = None
        self._stored = {}


@contextlib.contextmanager
def offloaded(module: nn.Module | None, directory: str | Path | None = None) -> Iterator[Offload | None]:
    """`module`'s tensors away for the block and back afterwards (also on error); None does nothing."""
    if module is None:
        yield None
        return
    offload = Offload(module, directory)
    offload.move_away()
    try:
        yield offload
    finally:
        offload.put_back()


class OffloadSet:
    """Several offloads that go away and come back together, with hooks run after going away and before
    coming back (a trainer switches its stand-ins on and off there)."""

    def __init__(self, offloads: list[Offload], on_away: Callable[[], None] | None = None,
                 on_back: Callable[[], None] | None = None):
        self.offloads = offloads
        self._on_away, self._on_back = on_away, on_back

    def move_away(self) -> None:
        for offload in self.offloads:
            offload.move_away()
        if self._on_away is not None:
            self._on_away()

    def put_back(self) -> None:
        if self._on_back is not None:
            self._on_back()
        for offload in self.offloads:
            offload.put_back()

    @contextlib.contextmanager
    def present_for(self) -> Iterator[None]:
        """Everything back for the block (e.g. a preview), then away again."""
        self.put_back()
        try:
            yield
        finally:
            self.move_away()
