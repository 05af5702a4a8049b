"""Aesthetic embeddings on disk: the original extension's ``<name>.pt`` holding one ``[1, dim]`` tensor.

Files in the wild differ (checked in the shipped archives): most are fp16, some fp32 saved on ``cuda:0``.
Reading goes through the restricted loader (tensors land on the CPU whatever device they were saved
on) and casts to float32. Writing goes through :func:`extensions_lib.formats.torch_pt.save_pt`, so a stock
WebUI on torch 2.1 accepts what we write.
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AlchemyError
from ..formats.torch_pt import save_pt
from ..safe_pickle import safe_load

DEFAULT_DIR = Path("models") / "aesthetic_embeddings"
SUFFIX = ".pt"
MAX_DIM = 8192
"""Wider than any CLIP projection (768 ViT-L, 1024 ViT-H, 1280 bigG); a declared size above it is refused."""
_NAME_RE = re.compile(r"^[^/\\:*?\"<>|\x00-\x1f]+$")


@dataclass(frozen=True)
class AestheticEmbedding:
    """name: the file stem (as the original lists it). vector: (dim,) float32, as saved (not normalised).
    digest: sha256[:10] of the vector's float32 bytes, for cache keys and the infotext."""

    name: str
    vector: torch.Tensor
    digest: str

    @property
    def dim(self) -> int:
        return int(self.vector.shape[0])

    def normalised(self) -> torch.Tensor:
        return self.vector / self.vector.norm().clamp_min(1e-12)


def vector_digest(vector: torch.Tensor) -> str:
    return hashlib.sha256(vector.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:10]


def from_tensor(name: str, data, path: str | os.PathLike = "<memory>") -> AestheticEmbedding:
    """Check what a file held: one tensor of shape (1, dim) or (dim,), finite, not all zero."""
    if not isinstance(data, torch.Tensor):
        raise AlchemyError(f"not an aesthetic embedding: holds a {type(data).__name__}, not a tensor", path,
                           "an aesthetic embedding .pt holds one [1, dim] tensor; make it with 'alchemy aesthetic create'")
    if data.ndim == 2 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 1 or not 1 <= data.shape[0] <= MAX_DIM or not data.is_floating_point():
        raise AlchemyError(f"not an aesthetic embedding: tensor of shape {list(data.shape)} and dtype {data.dtype}",
                           path, "an aesthetic embedding is a [1, dim] float tensor (dim 768 for SD1, 1024 for SD2)")
    vector = data.detach().to("cpu", torch.float32).clone()
    if not torch.isfinite(vector).all() or float(vector.norm()) == 0.0:
        raise AlchemyError("aesthetic embedding holds NaN, infinite or all-zero values", path,
                           "create it again from its image folder")
    return AestheticEmbedding(name, vector, vector_digest(vector))


def load_aesthetic(path: str | os.PathLike) -> AestheticEmbedding:
    """Read an aesthetic embedding ``.pt`` (any dtype, saved on any device)."""
    path = Path(path)
    return from_tensor(path.stem, safe_load(path), path)


def check_name(name: str) -> str:
    """A file stem the user typed: never a path, never empty or hidden."""
    name = (name or "").strip()
    if not name or name in (".", "..") or name.startswith(".") or not _NAME_RE.match(name):
        raise AlchemyError(f"unusable embedding name {name!r}",
                           fix="use a plain name without slashes or any of : * ? \" < > |")
    return name


def save_aesthetic(vector: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``vector`` as the original's ``[1, dim]`` float32 tensor (atomic; loads in a stock WebUI)."""
    vector = vector.detach().to("cpu", torch.float32).reshape(1, -1)
    return save_pt(vector, path)


class AestheticLibrary:
    """The ``*.pt`` files directly in one folder (the original lists that folder, not subfolders).

    A file that cannot be read is skipped with its reason (:attr:`skipped`); it never breaks the listing.
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.skipped: dict[str, str] = {}
        self._loaded: dict[str, tuple[tuple[int, int], AestheticEmbedding]] = {}

    def names(self) -> list[str]:
        if not self.folder.is_dir():
            return []
        return sorted((p.stem for p in self.folder.iterdir() if p.suffix == SUFFIX and p.is_file()
                       and not p.name.startswith(".")), key=str.lower)

    def path(self, name: str) -> Path:
        path = self.folder / f"{check_name(name)}{SUFFIX}"
        if not path.is_file():
            shown = ", ".join(self.names()) or "none"
            raise AlchemyError(f"aesthetic embedding {name!r} not found (in this folder: {shown})", path,
                               "create it with 'alchemy aesthetic create' or copy the .pt into the folder")
        return path

    def load(self, name: str) -> AestheticEmbedding:
        """The embedding, re-read only when its file changed."""
        path = self.path(name)
        stat = path.stat()
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._loaded.get(name)
        if cached is None or cached[0] != stamp:
            cached = (stamp, load_aesthetic(path))
            self._loaded[name] = cached
        return cached[1]

    def usable(self) -> list[str]:
        """Names that load; the others go to :attr:`skipped` with their reason."""
        out = []
        self.skipped = {}
        for name in self.names():
            try:
                self.load(name)
                out.append(name)
            except AlchemyError as exc:
                self.skipped[name] = exc.what
        return out
