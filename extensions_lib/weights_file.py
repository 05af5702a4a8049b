"""A model's weights from a file other people publish: ``.safetensors``, or a torch pickle read with the
restricted loader (``.pt``/``.bin``/``.ckpt``), often wrapped as ``{"state_dict": ...}`` by training scripts
and with ``module.`` key prefixes left by ``DataParallel``."""
from __future__ import annotations

from pathlib import Path

from .errors import AlchemyError


def unwrap_state_dict(obj: object) -> object:
    """The inner dict of a ``{"state_dict": {...}}`` checkpoint, else `obj` as it is."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    return obj


def read_state_dict(path: Path, what: str, fix: str) -> dict:
    """The file's weights by key (``module.`` prefixes dropped); `what`/`fix` word the error for a file that
    holds no dict of them."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    from .safe_pickle import safe_load

    state = unwrap_state_dict(safe_load(path))
    if not isinstance(state, dict):
        raise AlchemyError(what, path, fix)
    return {k.removeprefix("module."): v for k, v in state.items()}
