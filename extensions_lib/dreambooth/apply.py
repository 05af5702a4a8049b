"""LoRA files applied to the standalone model for generation (``alchemy txt2img --lora NAME[:W]``)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterator, Sequence

from ..errors import AlchemyError
from .lora import apply_lora_file, load_lora_file


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``NAME[:W]`` -> (name, weight); the weight defaults to 1 as in ``<lora:NAME>``."""
    name, sep, weight = text.rpartition(":") if ":" in text else (text, "", "")
    try:
        value = float(weight) if sep else 1.0
    except ValueError:
        raise AlchemyError(f"--lora {text!r}: the weight {weight!r} is not a number", fix="write NAME or NAME:0.8") from None
    return name.strip(), value


def find_lora(folder: Path, name: str) -> Path:
    """``<folder>/**/<name>.safetensors``; the name never becomes a path of its own."""
    if not name or any(c in name for c in "/\\\0") or name in (".", ".."):
        raise AlchemyError(f"LoRA name {name!r} is not a file name", fix="give the file name without .safetensors")
    folder = Path(folder)
    found = sorted(p for p in folder.rglob("*.safetensors") if p.stem == name) if folder.is_dir() else []
    if not found:
        raise AlchemyError(f"no LoRA named {name!r}", folder, fix="check --lora-dir and the name (file name without "
                                                                 ".safetensors)")
    return found[0]


@contextlib.contextmanager
def loras_applied(adapter, specs: Sequence[str], folder: Path,
                  warn: Callable[[str], None] = lambda line: None) -> Iterator[list]:
    """Apply each ``NAME[:W]`` LoRA to the model's UNet and text encoder inside the block; afterwards the
    original layers are back (outputs exactly as before)."""
    modules = adapter.modules()
    parts = {"unet": modules["unet"], "text_encoder": modules["text_encoder"]}
    patches = []
    try:
        for spec in specs:
            name, weight = parse_lora_arg(spec)
            path = find_lora(folder, name)
            patch, missing = apply_lora_file(parts, load_lora_file(path), weight, path, family=adapter.family)
            patches.append(patch)
            if missing:
                warn(f"{path}: {len(missing)} layers do not occur in this model or are not plain LoRA "
                     f"(e.g. {missing[0]}); they are left out")
        yield patches
    finally:
        for patch in reversed(patches):
            patch.remove()
