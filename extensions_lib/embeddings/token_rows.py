"""A frozen token embedding that holds only the rows prompts have used.

While an embedding trains, the text encoder's 49408-row token-embedding matrix is frozen and only the
rows of the tokens in the training prompts are ever read (a few dozen). :class:`TokenRows` stands in
for the matrix during training: it gathers the rows it has seen so far and fetches others when a
prompt first uses them (from the offloaded matrix, see :meth:`extensions_lib.train.offload.Offload.read_rows`). Its
output is the matrix's rows themselves, so encodings are bit-identical; the matrix itself can stay out
of memory (150 MB for SD1, 200 MB for SD2).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class TokenRows(nn.Module):
    """``forward(ids)`` = the full embedding's rows for `ids`; rows are fetched with `fetch(ids)` once."""

    def __init__(self, fetch: Callable[[list[int]], torch.Tensor], vocab_size: int, width: int,
                 dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.fetch = fetch
        self.register_buffer("position", torch.full((vocab_size,), -1, dtype=torch.long, device=device),
                             persistent=False)
        self.register_buffer("rows", torch.empty(0, width, dtype=dtype, device=device), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        ids = input_ids.to(self.position.device)
        missing = torch.unique(ids[self.position[ids] < 0]).tolist()
        if missing:
            fetched = self.fetch(missing).to(self.rows.device, self.rows.dtype)
            self.position[missing] = torch.arange(len(self.rows), len(self.rows) + len(missing),
                                                  device=self.position.device)
            self.rows = torch.cat([self.rows, fetched])
        return nn.functional.embedding(self.position[ids], self.rows)


def can_stand_in_for(module: nn.Module) -> bool:
    """Whether `module` is a plain embedding lookup (no max_norm renormalisation) TokenRows reproduces."""
    return isinstance(module, nn.Embedding) and module.max_norm is None and module.weight.dim() == 2
