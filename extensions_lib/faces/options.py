"""`alchemy faces` options, declared once (CLI flags, API bodies)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..options import option
from .load import DETECTORS


@dataclass
class FaceModelOptions:
    detector: str = option("yunet", help="yunet: photos (OpenCV YuNet, MIT); anime: drawings (YOLOv8 ONNX from "
                                         "deepghs/anime_face_detection, MIT); haar: OpenCV's bundled cascade, no "
                                         "model file", choices=list(DETECTORS))
    model: str = option("", help="the detector's model file (YuNet .onnx, or the anime model.onnx or its folder); "
                                 "empty: looked up in --models-dir", ui=False)
    models_dir: Optional[Path] = option(None, help="models folder: YuNet is looked up in its opencv/ (the WebUI's "
                                                   "own copy), anime in faces/anime_face_detection/*/ "
                                                   "[default: models]", ui=False)
    download: bool = option(False, help="download YuNet (pinned commit, checksum checked) if it is missing")
    threshold: Optional[float] = option(None, help="minimum face score; empty: the detector's default "
                                                   "(YuNet 0.9, anime 0.25)", minimum=0.0, maximum=1.0,
                                        widget="number")


@dataclass
class FaceScanOptions:
    recursive: bool = option(False, help="also check images in sub-folders")
    min_faces: int = option(0, help="flag images with fewer faces than this", minimum=0)
    max_faces: int = option(0, help="flag images with more faces than this; 0 = no limit", minimum=0)
    action: str = option("flag", help="flag: list flagged images (and mark them in the manifest); move: move "
                                      "them and their captions to --move-to", choices=["flag", "move"])
    move_to: Optional[Path] = option(None, help="folder flagged images are moved to (relative paths kept)",
                                     ui=False)
    manifest: Optional[Path] = option(None, help="JSONL with each image's face count and boxes "
                                                 "[default: DIR/faces.jsonl]", ui=False)
