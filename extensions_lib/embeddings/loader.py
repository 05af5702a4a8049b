"""An embeddings folder applied to a loaded model: what ``alchemy txt2img --embeddings-dir`` uses.

::

    with EmbeddingLoader(adapter, "embeddings") as loader:
        images = generate_from(adapter, opts, encode_fn=loader.encode,
                               extra_params=loader.infotext_params([opts.prompt, opts.negative]))

Entering patches the text encoder (:mod:`.patch`), leaving restores it. :meth:`EmbeddingLoader.encode`
re-scans the folder first, so files added, changed or removed while the model stays loaded are used
(or dropped) from the next encode on.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from ..prompt import encode_prompts, tokenize_segments
from .library import EmbeddingLibrary, LibraryEntry
from .patch import EmbeddingPatch, patch_text_encoders


class EmbeddingLoader:
    def __init__(self, adapter, directory: str | os.PathLike):
        self.adapter = adapter
        self.library = EmbeddingLibrary.for_model(directory, adapter)
        self._patch: EmbeddingPatch | None = None

    def __enter__(self) -> "EmbeddingLoader":
        self._patch = patch_text_encoders(self.adapter)
        return self

    def __exit__(self, *exc) -> None:
        if self._patch is not None:
            self._patch.unpatch()
            self._patch = None

    def encode(self, adapter, prompts: Sequence[str], clip_skip: int = 1, **kwargs) -> torch.Tensor:
        """``encode_prompts`` with this folder's embeddings (the ``encode_fn`` of generation)."""
        if adapter is not self.adapter or self._patch is None:
            raise RuntimeError("EmbeddingLoader.encode needs its own model, inside its 'with' block")
        self.library.refresh()
        return encode_prompts(adapter, prompts, clip_skip, matcher=self.library.matcher(), **kwargs)

    def used(self, prompts: Sequence[str]) -> list[LibraryEntry]:
        """The embeddings these prompts use, each once, in order of first use."""
        self.library.refresh()
        matcher = self.library.matcher()
        found: dict[str, LibraryEntry] = {}
        for prompt in prompts:
            for segment in tokenize_segments(self.adapter.tokenizer, prompt):
                for embedding in matcher.find_all(segment[0]) if segment is not None else []:
                    found.setdefault(embedding.name, self.library.entry(embedding.name))
        return list(found.values())

    def infotext_params(self, prompts: Sequence[str]) -> dict[str, str]:
        """``{"TI hashes": "name: sha256[:12], ..."}`` as the WebUI writes it, or {} when none is used."""
        used = self.used(prompts)
        if not used:
            return {}
        return {"TI hashes": ", ".join(f"{e.name}: {self.library.shorthash(e.name)}" for e in used)}
