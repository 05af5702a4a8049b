"""The checkpoint hash cache: one sha256 per file version, kept across runs in the cache folder."""
from __future__ import annotations

import hashlib
import json
import os
import shutil

from PIL import Image

from extensions_lib.backend import hash_cache
from extensions_lib.backend.hash_cache import CACHE_FILE, cached_sha256
from extensions_lib.cli import main


def _counting(monkeypatch):
    calls = []
    real = hash_cache.sha256_file

    def counted(path, *args, **kwargs):
        calls.append(str(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(hash_cache, "sha256_file", counted)
    return calls


def test_hash_is_computed_once_per_file_version(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    cache = tmp_path / "cache"
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"a" * 1000)
    expected = hashlib.sha256(b"a" * 1000).hexdigest()
    assert cached_sha256(path, cache) == expected
    assert cached_sha256(path, cache) == expected
    assert len(calls) == 1
    stored = json.loads((cache / CACHE_FILE).read_text())
    assert stored[f"checkpoint/{path.resolve()}"]["sha256"] == expected

    # same size, new content and mtime: hashed again
    path.write_bytes(b"b" * 1000)
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert cached_sha256(path, cache) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(calls) == 2

    # a second file gets its own entry, the first keeps its own
    other = tmp_path / "other.ckpt"
    other.write_bytes(b"c")
    assert cached_sha256(other, cache) == hashlib.sha256(b"c").hexdigest()
    assert cached_sha256(path, cache) == hashlib.sha256(b"b" * 1000).hexdigest()
    assert len(calls) == 3


def test_damaged_or_forged_cache_is_not_believed(tmp_path, monkeypatch):
    calls = _counting(monkeypatch)
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x" * 10)
    stat = path.stat()
    expected = hashlib.sha256(b"x" * 10).hexdigest()
    for content in ("{not json", "[1, 2]", json.dumps({f"checkpoint/{path.resolve()}": {
            "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": "../../etc"}})):
        (tmp_path / CACHE_FILE).write_text(content)
        assert cached_sha256(path, tmp_path) == expected
    assert len(calls) == 3
    assert cached_sha256(path, tmp_path) == expected and len(calls) == 3     # repaired


def test_second_txt2img_does_not_hash_the_checkpoint_again(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("ALCHEMY_CACHE_DIR", str(tmp_path / "cache"))
    ckpt = tmp_path / "model.safetensors"
    shutil.copy(tiny_checkpoint("sd1"), ckpt)
    calls = _counting(monkeypatch)
    common = ["txt2img", "--ckpt", str(ckpt), "--prompt", "a cat", "--width", "64", "--height", "64",
              "--steps", "1", "--seed", "3"]
    for i in range(2):
        assert main([*common, "--out", str(tmp_path / f"{i}.png")]) == 0
    assert calls == [str(ckpt.resolve())]
    short = hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    for i in range(2):
        with Image.open(tmp_path / f"{i}.png") as image:
            assert f"Model hash: {short}" in image.info["parameters"]
