"""The reversible text-encoder patch that splices embedding vectors into the token-embedding output.

:func:`patch_text_encoders` replaces each encoder's token-embedding module (``TextEncoderInfo.
token_embedding``, wherever the model holds it) with an :class:`EmbeddingsWithFixes` wrapping it; the
wrapper runs the original module and then, for each ``(offset, embedding)`` in
:func:`extensions_lib.prompt.active_fixes` for its row, overwrites rows ``offset + 1 ...`` (the +1 skips
the start token) with the embedding's vectors, cut short where the 77-row chunk ends: the WebUI's
``EmbeddingsWithFixes``. The splice is differentiable, which is how textual-inversion training reaches
its vectors.

Outside :func:`~extensions_lib.prompt.encode_prompts` there are no fixes and the wrapper returns the
original module's output unchanged. :meth:`EmbeddingPatch.unpatch` puts the original module objects
back, so encodings afterwards are those of the unpatched model, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..prompt import active_fixes


def vectors_for(payload: Any, key: str) -> torch.Tensor:
    """The (n, width) vectors of an embedding for the encoder named `key` ("" for SD1/SD2; "clip_l" or
    "clip_g" for SDXL, whose embeddings hold one tensor per encoder)."""
    vectors = payload.vectors
    if isinstance(vectors, dict):
        return vectors[key]
    return vectors


def splice_row(row: torch.Tensor, fixes: list[tuple[int, Any]], key: str = "") -> torch.Tensor:
    """One chunk's (77, C) token embeddings with each fix's vectors written at ``offset + 1`` onwards.

    Vectors that would run past the end of the chunk are cut off (the WebUI's ``emb_len``); they are
    cast to the row's device and dtype.
    """
    for offset, payload in fixes:
        vectors = vectors_for(payload, key).to(row.device, row.dtype)
        count = min(row.shape[0] - offset - 1, vectors.shape[0])
        row = torch.cat([row[:offset + 1], vectors[:count], row[offset + 1 + count:]])
    return row


class EmbeddingsWithFixes(nn.Module):
    """Wraps a token-embedding module; splices the active embedding fixes into its output."""

    def __init__(self, wrapped: nn.Module, key: str = ""):
        super().__init__()
        self.wrapped = wrapped
        self.key = key
        self.rows: nn.Module | None = None
        """Set by a trainer to a stand-in giving the same rows (:class:`.token_rows.TokenRows`) while the
        wrapped matrix is out of memory."""

    @property
    def weight(self) -> torch.Tensor:
        """The wrapped embedding's weight (code that reads token vectors keeps working while patched)."""
        return self.wrapped.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        out = (self.rows if self.rows is not None else self.wrapped)(input_ids)
        fixes = active_fixes()
        if not fixes or not any(fixes):
            return out
        if out.dim() != 3 or len(fixes) != out.shape[0]:
            raise RuntimeError(f"{len(fixes)} rows of embedding fixes for a token batch of shape "
                               f"{tuple(input_ids.shape)}: the encoder must embed exactly the chunks being encoded")
        return torch.stack([splice_row(row, row_fixes, self.key) if row_fixes else row
                            for row, row_fixes in zip(out, fixes)])


def unwrap(module: nn.Module) -> nn.Module:
    """The original token-embedding module under any :class:`EmbeddingsWithFixes`."""
    while isinstance(module, EmbeddingsWithFixes):
        module = module.wrapped
    return module


def _holders(roots: list[nn.Module], target: nn.Module) -> list[tuple[nn.Module, str]]:
    """Every (parent module, attribute name) that holds `target` as a direct child."""
    found, seen = [], set()
    for root in roots:
        for parent in root.modules():
            if id(parent) in seen:
                continue
            seen.add(id(parent))
            for name, child in parent.named_children():
                if child is target:
                    found.append((parent, name))
    return found


@dataclass
class EmbeddingPatch:
    """Installed wrappers; :meth:`unpatch` (or leaving a ``with`` block) restores the originals."""

    installed: list[tuple[nn.Module, str, nn.Module, EmbeddingsWithFixes]] = field(default_factory=list)

    @property
    def active(self) -> bool:
        return bool(self.installed)

    @property
    def wrappers(self) -> list[EmbeddingsWithFixes]:
        """Each installed wrapper once (an embedding held in two places has one wrapper)."""
        return list({id(w): w for _, _, _, w in self.installed}.values())

    def unpatch(self) -> None:
        for parent, name, original, wrapper in reversed(self.installed):
            setattr(parent, name, original)
            wrapper.rows = None
        self.installed.clear()

    def __enter__(self) -> "EmbeddingPatch":
        return self

    def __exit__(self, *exc) -> None:
        self.unpatch()


def patch_text_encoders(adapter) -> EmbeddingPatch:
    """Install :class:`EmbeddingsWithFixes` around every text encoder's token embedding of `adapter`.

    The module is found by identity among ``adapter.modules()`` and replaced where it is held, so the
    encoder calls the wrapper. Raises RuntimeError if an encoder is already patched or its token
    embedding is not part of the model's modules.
    """
    roots = list(adapter.modules().values())
    patch = EmbeddingPatch()
    try:
        for info in adapter.text_encoders:
            original = info.token_embedding
            holders = _holders(roots, original)
            if any(isinstance(parent, EmbeddingsWithFixes) for parent, _ in holders) or \
                    isinstance(original, EmbeddingsWithFixes):
                raise RuntimeError(f"text encoder {info.key or '(main)'} already has an embedding patch; "
                                   "unpatch it before patching again")
            if not holders:
                raise RuntimeError(f"the token embedding of text encoder {info.key or '(main)'} is not among the "
                                   "model's modules, so it cannot be patched")
            wrapper = EmbeddingsWithFixes(original, info.key)
            for parent, name in holders:
                setattr(parent, name, wrapper)
                patch.installed.append((parent, name, original, wrapper))
    except BaseException:
        patch.unpatch()
        raise
    return patch
