"""Score a folder: `alchemy watermark DIR` (scores cached by content hash beside the tagger's)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..checks.scan import scan_folder
from ..tagger.cache import ScoreCache, content_hash, default_cache_dir
from .options import WatermarkOptions

DEFAULT_MODEL = Path("models") / "watermark" / "watermark_model_v1.pt"


def scan_watermarks(folder, classifier, options: WatermarkOptions, **kwargs):
    n = 5 if options.corners else 1
    cache = None
    if options.cache:
        cache = ScoreCache(options.cache_dir or default_cache_dir(), classifier.model_id + f"-x{n}", n)

    def check(image, path):
        key = content_hash(Path(path).read_bytes()) if cache else ""
        parts = cache.get(key) if cache else None
        if parts is None:
            parts = np.asarray(classifier.score(image, corners=options.corners)[1], dtype=np.float32)
            if cache:
                cache.put(key, parts)
        record = {"watermark": round(float(parts.max()), 4)}
        if options.corners:
            record["parts"] = [round(float(p), 4) for p in parts]
        return record

    manifest = options.manifest or Path(folder).expanduser() / "watermarks.jsonl"
    return scan_folder(folder, check, lambda r: r["watermark"] >= options.threshold, recursive=options.recursive,
                       manifest=manifest, action=options.action, move_to=options.move_to, **kwargs)
