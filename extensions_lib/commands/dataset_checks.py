"""`alchemy faces`, `alchemy watermark`, `alchemy detext`: dataset checks with their own models."""
from __future__ import annotations


def register(subparsers) -> None:
    return None
