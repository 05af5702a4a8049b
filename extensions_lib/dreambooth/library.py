"""The LoRA folder as the DreamBooth tab lists it: every ``*.safetensors`` (recursively), by file stem."""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class LoraEntry:
    name: str
    path: Path
    layers: int
    error: str = ""


def _layers(path: Path) -> int:
    """Number of LoRA layers the file's safetensors header names (the header only; its size is checked)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("too short for a safetensors file")
        (size,) = struct.unpack("<Q", head)
        if size > min(MAX_HEADER, path.stat().st_size - 8):
            raise ValueError(f"declared header size {size} is larger than the file")
        header = json.loads(f.read(size))
    return sum(1 for k in header if k.endswith(".lora_down.weight"))


class LoraLibrary:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._entries: list[LoraEntry] = []
        self.refresh()

    def refresh(self) -> None:
        entries = []
        files = sorted(self.folder.rglob("*.safetensors")) if self.folder.is_dir() else []
        for path in files:
            try:
                entries.append(LoraEntry(path.stem, path, _layers(path)))
            except (OSError, ValueError) as exc:
                entries.append(LoraEntry(path.stem, path, 0, str(exc)))
        self._entries = entries

    def entries(self) -> list[LoraEntry]:
        return list(self._entries)

    def names(self) -> list[str]:
        return [e.name for e in self._entries if not e.error]
