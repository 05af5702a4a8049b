"""Where Alchemy keeps what it can recompute (tokenizer files, checkpoint hashes, tagger scores, captions,
thumbnails, the demo model): one root for all of them."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "ALCHEMY_CACHE_DIR"


def default_cache_dir() -> Path:
    """$ALCHEMY_CACHE_DIR, else $XDG_CACHE_HOME/alchemy, else ~/.cache/alchemy."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "alchemy"
