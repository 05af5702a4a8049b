"""One entry point from a detector name to a loaded detector."""
from __future__ import annotations

import os
from typing import Callable

from .base import FaceDetector

DETECTORS = ("yunet", "anime", "haar")


def load_detector(kind: str, *, model: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None,
                  download: bool = False, threshold: float | None = None, device: str = "auto", device_id: int = 0,
                  report: Callable[[str], None] | None = None) -> FaceDetector:
    """`kind` "yunet" (photos; OpenCV), "anime" (drawings; onnxruntime) or "haar" (OpenCV's cascade)."""
    from . import models

    if kind == "yunet":
        from .yunet import SCORE_THRESHOLD, YuNetDetector

        path = models.yunet_path(model, models_dir, download=download, report=report)
        return YuNetDetector(path, score_threshold=SCORE_THRESHOLD if threshold is None else threshold)
    if kind == "anime":
        from .anime import CONF_THRESHOLD, AnimeFaceDetector

        return AnimeFaceDetector(models.anime_path(model, models_dir),
                                 conf_threshold=CONF_THRESHOLD if threshold is None else threshold,
                                 device=device, device_id=device_id, report=report)
    if kind == "haar":
        from .haar import HaarDetector

        return HaarDetector()
    raise ValueError(f"unknown face detector {kind!r} (one of {DETECTORS})")
