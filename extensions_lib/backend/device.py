"""Where the standalone backend runs: the one place the ``--device auto`` choice is resolved."""
from __future__ import annotations

import torch


def resolve_device(name: str | torch.device) -> torch.device:
    """`name` as a device; "auto" is cuda when there is one, else cpu."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
