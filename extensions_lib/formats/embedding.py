"""The textual-inversion `Embedding` and `read_embedding`, which reads every form the WebUI reads.

Forms (details in each module): WebUI `.pt` (`string_to_param`), diffusers/kohya single-tensor
`.bin`/`.pt`/`.safetensors`, SDXL `{"clip_l", "clip_g"}`, and embeddings stored inside PNG/WebP
images (text chunk or pixels). Which form a file holds is decided by its bytes, not its suffix; the
dict a container yields is then interpreted by the host's rules in `embedding_from_data`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Union

import torch

from ..errors import AlchemyError

Vectors = Union[torch.Tensor, dict]  # (n, width) or {"clip_l": (n, 768), "clip_g": (n, 1280)}

SDXL_KEYS = ("clip_l", "clip_g")
# The host's loader only looks at these suffixes (upper-cased) and skips `*.preview.<ext>` images.
HOST_EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", ".png", ".webp", ".jxl", ".avif")
IMAGE_SUFFIXES = (".png", ".webp", ".jxl", ".avif")


@dataclass
class Embedding:
    """Vectors plus what the WebUI records about them; tensors are float32 on the CPU."""

    name: str
    vectors: Vectors
    step: int | None = None
    sd_checkpoint: str | None = None       # checkpoint short hash (sha256[:10])
    sd_checkpoint_name: str | None = None  # checkpoint model name
    extra: dict[str, Any] = field(default_factory=dict)  # our provenance (JSON-able), ignored by the host
    filename: str | None = None

    @property
    def is_sdxl(self) -> bool:
        return isinstance(self.vectors, dict)

    @property
    def num_vectors(self) -> int:
        return int(self.vectors["clip_g"].shape[0] if self.is_sdxl else self.vectors.shape[0])

    @property
    def width(self) -> int:
        """The host's `shape`: last dim, or 768 + 1280 = 2048 for SDXL; compared with the model's width."""
        if self.is_sdxl:
            return int(sum(self.vectors[k].shape[-1] for k in SDXL_KEYS))
        return int(self.vectors.shape[-1])

    def checksum(self) -> str:
        """The host's 4-hex `Embedding.checksum()`; the `.optim` side file is tied to it."""
        flat = torch.cat([v.reshape(-1) for v in self._tensors()]) * 100
        r = 0
        for v in flat.tolist():
            r = ((r * 281) ^ (int(v) * 997)) & 0xFFFFFFFF
        return f"{r & 0xFFFF:04x}"

    def _tensors(self) -> list[torch.Tensor]:
        return [self.vectors[k] for k in SDXL_KEYS] if self.is_sdxl else [self.vectors]

    def host_dict(self) -> dict[str, Any]:
        """The dict the WebUI's `Embedding.save` writes (SD1/SD2 only)."""
        if self.is_sdxl:
            raise ValueError("SDXL embeddings have no WebUI .pt layout; write them as .safetensors")
        return {
            "string_to_token": {"*": 265},
            "string_to_param": {"*": self.vectors},
            "name": self.name,
            "step": self.step,
            "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name,
        }


def name_from_path(path: str | os.PathLike) -> str:
    """The host's name for a file: its base name without the last suffix (`a.b.pt` -> `a.b`)."""
    return os.path.splitext(os.path.basename(os.fspath(path)))[0]


def is_embedding_candidate(path: str | os.PathLike) -> bool:
    """Whether the host's directory walk would try this file (known suffix, not a preview, not empty)."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in HOST_EMBEDDING_SUFFIXES:
        return False
    if suffix in IMAGE_SUFFIXES and p.stem.lower().endswith(".preview"):
        return False
    return p.is_file() and p.stat().st_size > 0


def _as_float32(t: Any, path: str, what: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise AlchemyError(f"{what} is a {type(t).__name__}, not a tensor", path, _NOT_EMBEDDING_FIX)
    return t.detach().to("cpu", torch.float32)


_NOT_EMBEDDING_FIX = "use a textual-inversion embedding file (.pt, .bin, .safetensors or an embedding image)"


def _describe_non_embedding(data: Mapping) -> str:
    keys = list(data.keys())
    if any(isinstance(k, int) for k in keys) and "layer_structure" in data:
        return "this is a hypernetwork, not an embedding (put it in models/hypernetworks)"
    if any(isinstance(k, str) and ("lora_" in k or ".alpha" in k) for k in keys):
        return "this looks like a LoRA, not an embedding (put it in models/Lora)"
    if "state_dict" in data or len(keys) > 50:
        return "this looks like a model checkpoint, not an embedding"
    return "neither a textual-inversion embedding nor a diffusers concept"


def embedding_from_data(data: Any, name: str, path: str, *, metadata: Mapping[str, Any] | None = None) -> Embedding:
    """Interpret a loaded dict by the host's rules: `string_to_param`, SDXL pair, or one single tensor."""
    if not isinstance(data, Mapping) or not data:
        raise AlchemyError(f"holds a {type(data).__name__}, not an embedding dict", path, _NOT_EMBEDDING_FIX)
    if "string_to_param" in data:
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)  # an nn.ParameterDict from old torch
        if not isinstance(params, Mapping) or len(params) != 1:
            raise AlchemyError("embedding file has multiple terms in it (or none)", path,
                               "keep one term per file; split it into separate files")
        vectors = _as_float32(next(iter(params.values())), path, "string_to_param entry")
    elif all(k in data for k in SDXL_KEYS):
        extra_keys = set(data) - set(SDXL_KEYS)
        if extra_keys:
            raise AlchemyError(f"SDXL embedding with unexpected keys {sorted(map(str, extra_keys))}", path,
                               "an SDXL embedding holds exactly clip_l and clip_g")
        vectors = {k: _as_float32(data[k], path, k) for k in SDXL_KEYS}
        shapes = {k: tuple(v.shape) for k, v in vectors.items()}
        if any(len(shape) != 2 for shape in shapes.values()):
            raise AlchemyError(f"SDXL tensors have shapes {shapes}, expected (vectors, width) each", path,
                               _NOT_EMBEDDING_FIX)
        if vectors["clip_l"].shape[0] != vectors["clip_g"].shape[0]:
            raise AlchemyError("clip_l and clip_g hold different numbers of vectors", path,
                               "the file is damaged; save it again")
    elif isinstance(next(iter(data.values())), torch.Tensor):
        if len(data) != 1:
            raise AlchemyError(f"embedding file has multiple terms in it ({len(data)} tensors); "
                               + _describe_non_embedding(data), path, _NOT_EMBEDDING_FIX)
        vectors = _as_float32(next(iter(data.values())), path, "tensor")
        if vectors.dim() == 1:
            vectors = vectors.unsqueeze(0)
    else:
        raise AlchemyError(_describe_non_embedding(data), path, _NOT_EMBEDDING_FIX)
    if not isinstance(vectors, dict) and vectors.dim() != 2:
        raise AlchemyError(f"embedding tensor has shape {tuple(vectors.shape)}, expected (vectors, width)", path,
                           _NOT_EMBEDDING_FIX)
    info = dict(metadata or data)
    return Embedding(
        name=name, vectors=vectors, step=_int_or_none(info.get("step")),
        sd_checkpoint=_str_or_none(info.get("sd_checkpoint")),
        sd_checkpoint_name=_str_or_none(info.get("sd_checkpoint_name")),
        extra=dict(info.get("alchemy") or {}) if isinstance(info.get("alchemy"), Mapping) else {},
        filename=path,
    )


def _int_or_none(v: Any) -> int | None:
    try:
        return None if v is None or v == "" else int(v)
    except (TypeError, ValueError, OverflowError):  # e.g. "step": Infinity in an image's JSON
        return None


def _str_or_none(v: Any) -> str | None:
    return None if v is None else str(v)


def _sniff(head: bytes, size: int) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "torch"
    if head.startswith(b"\x89PNG\r\n\x1a\n") or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return "image"
    if head[4:12] == b"ftypavif" or head.startswith(b"\xff\x0a") or head[4:8] == b"JXL ":
        return "image"
    # safetensors: u64 header length, then the JSON header (checked before pickle: 0x80 can start both)
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return "safetensors"
    if head[:1] == b"\x80":  # a pickle protocol opcode: legacy (pre-zip) torch file
        return "torch"
    return "unknown"


def read_embedding(path: str | os.PathLike) -> Embedding:
    """Read an embedding in any form the WebUI reads; AlchemyError naming the file otherwise."""
    from . import embedding_image, embedding_pt, embedding_safetensors  # they build on this module

    path = os.fspath(path)
    if not os.path.isfile(path):  # a FIFO or device is never opened: reading it could block or never end
        raise AlchemyError("not a regular file" if os.path.exists(path) else "file not found", path, "check the path")
    with open(path, "rb") as fh:
        head = fh.read(16)
    kind = _sniff(head, os.path.getsize(path))
    if kind == "torch":
        return embedding_pt.read_embedding_pt(path)
    if kind == "safetensors":
        return embedding_safetensors.read_embedding_safetensors(path)
    if kind == "image":
        return embedding_image.read_embedding_image(path)
    what = "empty file" if not head else "not an embedding file (unknown content)"
    raise AlchemyError(what, path, _NOT_EMBEDDING_FIX)


def write_embedding(embedding: Embedding, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Write by suffix: `.pt`, `.safetensors`, or `.png`/`.webp` (embedding inside a preview image)."""
    from . import embedding_image, embedding_pt, embedding_safetensors

    suffix = Path(path).suffix.lower()
    if suffix == ".pt":
        return embedding_pt.save_embedding_pt(embedding, path, **kwargs)
    if suffix == ".safetensors":
        return embedding_safetensors.save_embedding_safetensors(embedding, path, **kwargs)
    if suffix in (".png", ".webp"):
        return embedding_image.save_embedding_image(embedding, path, **kwargs)
    raise AlchemyError(f"cannot write embeddings as '{suffix}'", path, "use .pt, .safetensors, .png or .webp")


def scan_embedding_dir(directory: str | os.PathLike) -> tuple[list[Embedding], list[AlchemyError]]:
    """Every embedding under `directory` (walked like the host: symlinks followed, previews and empty
    files skipped), sorted by lower-cased name, plus one error per file that could not be read."""
    found: list[Embedding] = []
    problems: list[AlchemyError] = []
    for root, _dirs, files in os.walk(directory, followlinks=True):
        for fname in sorted(files):
            path = os.path.join(root, fname)
            if not is_embedding_candidate(path):
                continue
            try:
                found.append(read_embedding(path))
            except AlchemyError as exc:
                problems.append(exc)
    found.sort(key=lambda e: e.name.lower())
    return found, problems
