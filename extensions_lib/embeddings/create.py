"""Create a new embedding file from an initialization text (the WebUI's "Create embedding").

The vectors start as the token embeddings of the init text, spread over the requested number of
vectors as the host does: vector i is token ``i * n_tokens // vectors`` (so tokens repeat when there
are more vectors than tokens, and are sampled when there are fewer). Like the host, CLIP-L tokenizers
(SD1, SDXL's clip_l) first cut the init text to `vectors` tokens and OpenCLIP ones (SD2, clip_g) do
not. An empty init text gives zero vectors. SDXL models get the ``{"clip_l", "clip_g"}`` pair the host
loads (the host's own Create tab writes a single 2048-wide tensor that it cannot use).

The token vectors are read from the embedding weight on whatever device it lives, so creating works
while the text encoder is offloaded to the CPU and the UNet sits on a GPU (the host's issue #2399).
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import AlchemyError
from ..names import name_problem
from ..formats.embedding import Embedding, write_embedding
from ..prompt import CHUNK_LENGTH
from .library import EmbeddingLibrary
from .patch import unwrap

_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}
MAX_NAME_LENGTH = 200


def check_name(name: str) -> str:
    """`name` if it can be an embedding's file name everywhere the WebUI runs; AlchemyError otherwise.

    The host silently drops characters other than letters, digits and ``._- ``; we refuse instead, so
    the word used in prompts is exactly the name the user typed.
    """
    what = name_problem(name)
    if what:
        pass
    elif not name or not name.strip():
        what = "is empty"
    elif not all(ch.isalnum() or ch in "._- " for ch in name) or not any(ch.isalnum() for ch in name):
        bad = sorted({ch for ch in name if not ch.isalnum() and ch not in "._- "})
        what = (f"contains characters a file name cannot safely hold ({' '.join(map(repr, bad))})" if bad
                else "has no letter or digit")
    elif name != name.strip() or name.endswith("."):
        what = "starts or ends with a space, or ends with a dot"
    elif name.startswith("."):
        what = "starts with a dot (a hidden file)"
    elif name.split(".")[0].lower() in _WINDOWS_RESERVED:
        what = "is a device name Windows reserves"
    elif len(name) > MAX_NAME_LENGTH:
        what = f"is longer than {MAX_NAME_LENGTH} characters"
    if what:
        raise AlchemyError(f"embedding name {name!r} {what}",
                           fix="use letters, digits, '.', '_', '-' and inner spaces, e.g. 'my-style'")
    return name


def spread_vectors(token_vectors: torch.Tensor, count: int) -> torch.Tensor:
    """(count, C) from (n_tokens, C): row i is token ``i * n_tokens // count``; zeros when n_tokens is 0."""
    n_tokens, width = token_vectors.shape
    if n_tokens == 0:
        return torch.zeros(count, width, dtype=token_vectors.dtype)
    return torch.stack([token_vectors[i * n_tokens // count] for i in range(count)])


def _cuts_to_count(adapter, key: str) -> bool:
    """CLIP-L tokenization cuts the init text to the vector count in the host; OpenCLIP's does not."""
    return key == "clip_l" or (key == "" and adapter.family == "sd1")


def init_vectors(adapter, init_text: str, count: int) -> torch.Tensor | dict[str, torch.Tensor]:
    """The starting vectors for an embedding of `count` vectors (float32, CPU); a dict for SDXL."""
    if not 1 <= count <= CHUNK_LENGTH:
        raise AlchemyError(f"number of vectors per token must be 1 to {CHUNK_LENGTH}, got {count}")
    ids = adapter.tokenizer.tokenize([init_text])[0] if init_text else []
    if init_text and not ids:
        raise AlchemyError(f"initialization text {init_text!r} has no tokens",
                           fix="use a word or two describing the concept, '*', or an empty text for zero vectors")
    result = {}
    for info in adapter.text_encoders:
        weight = unwrap(info.token_embedding).weight
        used = ids[:count] if _cuts_to_count(adapter, info.key) else ids
        index = torch.tensor(used, dtype=torch.long, device=weight.device)
        with torch.no_grad():
            rows = weight.detach()[index].to("cpu", torch.float32)
        result[info.key] = spread_vectors(rows, count).clone()
    return result[""] if set(result) == {""} else result


def check_free(directory: Path, name: str, target: Path, overwrite: bool) -> None:
    """AlchemyError unless `target` may be written: no embedding below `directory` is called `name` (in any
    format or sub-folder, or differing only in case, which the tokenizer cannot tell apart), except
    `target` itself when `overwrite`."""
    clashes = [e for e in EmbeddingLibrary(directory).entries() if e.name.lower() == name.lower()]
    blocking = [e for e in clashes if not (overwrite and e.path == target)]
    if blocking:
        other = blocking[0]
        fix = ("choose another name, or turn on overwrite to replace it" if other.path == target else
               "choose another name, or remove or rename that file first (overwrite only replaces "
               f"{target.name})")
        raise AlchemyError(f"an embedding named {other.name!r} already exists", other.path, fix)


def create_embedding(adapter, name: str, init_text: str = "*", vectors: int = 1, overwrite: bool = False, *,
                     directory: str | os.PathLike) -> Path:
    """Write ``<directory>/<name>.pt`` (``.safetensors`` for SDXL; step 0) with vectors from `init_text`; returns the path.

    Refuses a name that is not a safe file name, and one that any embedding below `directory` already
    has (also in another format or sub-folder, or differing only in case, which the tokenizer cannot
    tell apart) unless `overwrite` and the existing file is exactly the one to write.
    """
    check_name(name)
    directory = Path(directory)
    # The host's .pt layout holds one tensor: SDXL pairs go to .safetensors.
    suffix = ".safetensors" if any(info.key for info in adapter.text_encoders) else ".pt"
    target = directory / f"{name}{suffix}"
    check_free(directory, name, target, overwrite)
    embedding = Embedding(name=name, vectors=init_vectors(adapter, init_text, vectors), step=0)
    return write_embedding(embedding, target)
