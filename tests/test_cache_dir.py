"""One cache root: every cache (tokenizer files, hashes, tagger scores, captions, thumbnails) lives under
$ALCHEMY_CACHE_DIR when it is set, else $XDG_CACHE_HOME/alchemy, else ~/.cache/alchemy."""
from __future__ import annotations

from pathlib import Path

from extensions_lib.backend import tokenizer
from extensions_lib.cache_dir import default_cache_dir
from extensions_lib.tag_editor.thumbs import default_thumb_dir
from extensions_lib.tagger import cache as tagger_cache


def test_every_cache_follows_the_one_root(tmp_path, monkeypatch):
    monkeypatch.delenv("ALCHEMY_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "alchemy"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "alchemy"
    monkeypatch.setenv("ALCHEMY_CACHE_DIR", str(tmp_path / "mine"))
    root = tmp_path / "mine"
    assert default_cache_dir() == root == tokenizer.default_cache_dir()
    assert tagger_cache.default_cache_dir() == root / "tagger"
    assert default_thumb_dir() == root / "thumbnails"
