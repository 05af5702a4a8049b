"""`alchemy watermark` options, declared once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..options import option


@dataclass
class WatermarkOptions:
    model: str = option("", help="watermark_model_v1.pt (LAION-5B-WatermarkDetection, MIT) or a .safetensors copy; "
                                 "empty: models/watermark/watermark_model_v1.pt", ui=False)
    threshold: float = option(0.5, help="flag images whose P(watermark) is at least this (SD v1's training data "
                                        "kept < 0.5)", minimum=0.0, maximum=1.0, step=0.01)
    corners: bool = option(False, help="also score the four corner quarters and take the maximum: catches small "
                                       "corner watermarks the full-image score misses (5x the work)")
    recursive: bool = option(False, help="also check images in sub-folders")
    action: str = option("flag", help="flag: list flagged images (and mark them in the manifest); move: move "
                                      "them and their captions to --move-to", choices=["flag", "move"])
    move_to: Optional[Path] = option(None, help="folder flagged images are moved to (relative paths kept)", ui=False)
    manifest: Optional[Path] = option(None, help="JSONL with each image's score [default: DIR/watermarks.jsonl]",
                                      ui=False)
    cache: bool = option(True, help="cache scores per (image content, model): a re-run with another threshold "
                                    "does not run the model")
    cache_dir: Optional[Path] = option(None, help="score cache folder [default: ~/.cache/alchemy/tagger]", ui=False)
    device: str = option("auto", help="where the model runs", choices=["auto", "cpu", "cuda"])
