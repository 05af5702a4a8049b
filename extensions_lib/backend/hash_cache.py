"""Checkpoint sha256 computed once per file version, like the WebUI's ``cache.json``.

Hashing a 2 GB checkpoint takes seconds, and every generation's infotext names the model's short hash. The
WebUI keeps ``{"checkpoint/<title>": {"mtime": ..., "sha256": ...}}`` in ``cache.json``; we keep the same
kind of record in ``<cache folder>/hashes.json``, keyed by the resolved path and checked against the file's
size and mtime (in nanoseconds), so a replaced or edited file is hashed again. The file is rewritten
atomically; a damaged or foreign one is treated as empty.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..atomic import write_text

CACHE_FILE = "hashes.json"
_SHA256 = re.compile(r"[0-9a-f]{64}")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def _read(cache_path: Path) -> dict:
    try:
        data = json.loads(cache_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def cached_sha256(path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """sha256 of `path`, from the cache while the file's size and mtime are unchanged."""
    if cache_dir is None:
        from ..cache_dir import default_cache_dir

        cache_dir = default_cache_dir()
    path = Path(path).resolve()
    stat = path.stat()
    key = f"checkpoint/{path}"
    cache_path = Path(cache_dir) / CACHE_FILE
    entry = _read(cache_path).get(key)
    if (isinstance(entry, dict) and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns
            and isinstance(entry.get("sha256"), str) and _SHA256.fullmatch(entry["sha256"])):
        return entry["sha256"]
    digest = sha256_file(path)
    data = _read(cache_path)         # re-read: another process may have added entries meanwhile
    data[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
    try:
        write_text(cache_path, json.dumps(data, indent=1, sort_keys=True))
    except OSError:
        pass                         # an unwritable cache costs time, never the result
    return digest
