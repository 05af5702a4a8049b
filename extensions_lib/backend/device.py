"""Where the standalone backend runs: the one place the ``--device`` choice is resolved and checked, so that
``--device cuda`` on a machine without a GPU is a message, not a traceback from deep inside model loading."""
from __future__ import annotations

import torch

from ..errors import AlchemyError

_FIX = "use --device cpu (or auto, which picks a GPU only when one is usable)"


def resolve_device(name: str | torch.device) -> torch.device:
    """`name` as a device once it names hardware this process can use ("auto": cuda when there is one, else
    cpu); AlchemyError otherwise."""
    if isinstance(name, str) and name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise AlchemyError(f"unknown device {str(name)!r} ({exc})", fix="use cpu, cuda, cuda:1, mps, ...") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "this torch has no CUDA support" if torch.version.cuda is None else "no usable NVIDIA GPU was found"
            raise AlchemyError(f"device {str(name)!r} was asked for, but {built}", fix=_FIX)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AlchemyError(f"device {str(name)!r} does not exist: {torch.cuda.device_count()} GPU(s) found",
                               fix=f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise AlchemyError(f"device {str(name)!r} was asked for, but Apple's MPS is not available here", fix=_FIX)
    return dev
