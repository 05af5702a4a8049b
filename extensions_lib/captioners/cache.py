"""Captioner results on disk, keyed by image content: a re-run only works on images it has not seen.

Texts (BLIP sentences, interrogator prompts) live one small JSON file per image under
``<root>/<kind>/<model id>-<settings digest>/<ab>/<key>.json``; CLIP image features use the tagger's
:class:`~extensions_lib.tagger.cache.ScoreCache` (a float32 vector per image). Entries are written
atomically; a damaged one reads as a miss.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..atomic import atomic_open
from ..options import to_dict


def settings_digest(*parts) -> str:
    """A short digest of option objects and strings, so other settings get other cache folders."""
    blob = json.dumps([to_dict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


class TextCache:
    def __init__(self, root: str | os.PathLike, kind: str, model_id: str, settings: str):
        self.dir = Path(root) / kind / f"{model_id}-{settings}"

    def _path(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.json"

    def get(self, key: str) -> str | None:
        try:
            record = json.loads(self._path(key).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        text = record.get("text") if isinstance(record, dict) else None
        return text if isinstance(text, str) else None

    def put(self, key: str, text: str) -> None:
        with atomic_open(self._path(key), "w") as fh:
            json.dump({"text": text}, fh, ensure_ascii=False)


def pair_key(image_key: str, text: str) -> str:
    """Key of a result that depends on the image and on a text (an interrogator prompt built on a sentence)."""
    return hashlib.sha256(f"{image_key}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()
