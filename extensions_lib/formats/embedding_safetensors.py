"""Embeddings as `.safetensors`: `emb_params` (SD1/SD2, kohya's key) or `clip_l` + `clip_g` (SDXL).

The host loads only the tensors and names the embedding after the file; we also keep name, step,
checkpoint and provenance in the header metadata (strings only, as the format requires).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..atomic import write_bytes
from ..errors import AlchemyError
from .embedding import SDXL_KEYS, Embedding, embedding_from_data, name_from_path

SD_KEY = "emb_params"
PROVENANCE_KEY = "alchemy"


def _metadata(embedding: Embedding) -> dict[str, str]:
    meta = {"name": embedding.name, "step": embedding.step, "sd_checkpoint": embedding.sd_checkpoint,
            "sd_checkpoint_name": embedding.sd_checkpoint_name}
    out = {k: str(v) for k, v in meta.items() if v is not None}
    if embedding.extra:
        out[PROVENANCE_KEY] = json.dumps(embedding.extra, sort_keys=True)
    return out


def save_embedding_safetensors(embedding: Embedding, path: str | os.PathLike) -> Path:
    from safetensors.torch import save

    if embedding.is_sdxl:
        tensors = {k: embedding.vectors[k] for k in SDXL_KEYS}
    else:
        tensors = {SD_KEY: embedding.vectors}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    target = Path(path)
    write_bytes(target, save(tensors, metadata=_metadata(embedding)))
    return target


def _parse_metadata(meta: dict[str, str]) -> dict[str, Any]:
    parsed: dict[str, Any] = dict(meta)
    if PROVENANCE_KEY in parsed:
        try:
            parsed[PROVENANCE_KEY] = json.loads(parsed[PROVENANCE_KEY])
        except ValueError:
            parsed[PROVENANCE_KEY] = {}
    return parsed


def read_embedding_safetensors(path: str | os.PathLike) -> Embedding:
    from safetensors import safe_open

    path = os.fspath(path)
    try:
        with safe_open(path, framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            data = {k: fh.get_tensor(k) for k in fh.keys()}
    except Exception as exc:  # SafetensorError, OSError on a truncated file, ...
        raise AlchemyError(f"not a readable .safetensors file ({exc})", path,
                           "the file is damaged; download or save it again") from exc
    return embedding_from_data(data, name_from_path(path), path, metadata=_parse_metadata(meta))
