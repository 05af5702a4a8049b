"""Embeddings as torch pickles: the WebUI's `.pt` layout, diffusers `.bin`, and the `.pt.optim` side file.

We write the host's exact layout through `save_pt` (so a stock WebUI on torch 2.1 accepts the file)
and add our provenance under one extra key, which the host's loader never looks at. SDXL pairs have
no WebUI `.pt` layout of their own: they are written as the bare `{"clip_l", "clip_g"}` dict the host
accepts, with nothing else in it (the host would try to treat any extra key as a tensor).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import AlchemyError
from ..safe_pickle import safe_load
from .embedding import SDXL_KEYS, Embedding, embedding_from_data, name_from_path
from .torch_pt import save_pt

PROVENANCE_KEY = "alchemy"


def read_embedding_pt(path: str | os.PathLike) -> Embedding:
    """A `.pt`/`.bin` embedding in any layout the host accepts; named after the file like the host does."""
    path = os.fspath(path)
    return embedding_from_data(safe_load(path), name_from_path(path), path)


def embedding_pt_dict(embedding: Embedding) -> dict[str, Any]:
    if embedding.is_sdxl:
        return {k: embedding.vectors[k] for k in SDXL_KEYS}
    data = embedding.host_dict()
    if embedding.extra:
        data[PROVENANCE_KEY] = dict(embedding.extra)
    return data


def save_embedding_pt(embedding: Embedding, path: str | os.PathLike) -> Path:
    """Write the WebUI `.pt` layout (atomic; loads in a stock WebUI v1.10.1)."""
    return save_pt(embedding_pt_dict(embedding), path)


def optim_path(pt_path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(pt_path)}.optim")


def save_optimizer_state(embedding: Embedding, pt_path: str | os.PathLike, state_dict: dict) -> Path:
    """`<file>.pt.optim` as the host writes it: tied to the embedding by its checksum."""
    return save_pt({"hash": embedding.checksum(), "optimizer_state_dict": state_dict}, optim_path(pt_path))


def load_optimizer_state(embedding: Embedding, pt_path: str | os.PathLike) -> dict | None:
    """The saved optimizer state if the side file exists and belongs to these vectors, else None.

    A mismatching hash means the vectors changed after the state was saved (the host then starts the
    optimizer afresh, and so do we).
    """
    path = optim_path(pt_path)
    if not path.is_file():
        return None
    data = safe_load(path)
    if not isinstance(data, dict) or "optimizer_state_dict" not in data:
        raise AlchemyError("not an optimizer state file", path, "delete it; training then starts a fresh optimizer")
    if data.get("hash") != embedding.checksum():
        return None
    return data["optimizer_state_dict"]
