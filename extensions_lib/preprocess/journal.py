"""Resume record for `alchemy preprocess`: which sources are already done, for which options.

Kept as one small JSON file in the destination, rewritten atomically. A source counts as done only
when its size, modification time and output index are unchanged, the options fingerprint matches
and every output it produced still exists; anything else is processed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from ..atomic import write_text

JOURNAL_NAME = ".alchemy-preprocess.json"
SAVE_EVERY_S = 2.0  # an interrupted run repeats at most this much work


def fingerprint(settings: dict) -> str:
    """Stable hash of everything that changes the outputs."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_signature(path: Path, index: int) -> list:
    st = path.stat()
    return [index, st.st_size, st.st_mtime_ns]


class Journal:
    def __init__(self, dst: Path, settings_fingerprint: str):
        self.path = dst / JOURNAL_NAME
        self.fingerprint = settings_fingerprint
        self.entries: dict[str, dict] = {}
        self.options_changed = False
        self._last_save = time.monotonic()
        self._dirty = False
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return  # none yet, or damaged: start over
        if data.get("fingerprint") == settings_fingerprint:
            self.entries = data.get("sources", {})
        else:
            self.options_changed = bool(data.get("sources"))

    def done(self, key: str, signature: list, dst: Path) -> list[str] | None:
        """The output file names recorded for a finished, unchanged source, or None."""
        entry = self.entries.get(key)
        if not entry or entry.get("signature") != signature:
            return None
        outputs = entry.get("outputs", [])
        if not all(os.path.exists(dst / name) for name in outputs):
            return None
        return outputs

    def record(self, key: str, signature: list, outputs: list[str]) -> None:
        self.entries[key] = {"signature": signature, "outputs": outputs}
        self._dirty = True
        if time.monotonic() - self._last_save >= SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        if not self._dirty:
            return
        write_text(self.path, json.dumps({"fingerprint": self.fingerprint, "sources": self.entries}, indent=1))
        self._dirty = False
        self._last_save = time.monotonic()
