"""OpenCV's bundled Haar cascade: no model file, weakest of the three, the fallback when YuNet is missing.

The WebUI's fallback tested ``if faces:`` on the N x 4 array detectMultiScale returns, which raises
as soon as a face is found; here the rows are simply iterated.
"""
from __future__ import annotations

import os

import numpy as np
from PIL import Image

from ..errors import AlchemyError
from .base import Face, to_rgb

CASCADE = "haarcascade_frontalface_default.xml"


class HaarDetector:
    def __init__(self, min_neighbors: int = 7, scale_factor: float = 1.1, min_size: float = 0.05):
        from .yunet import import_cv2

        cv2 = import_cv2()
        path = os.path.join(getattr(getattr(cv2, "data", None), "haarcascades", ""), CASCADE)
        self._classifier = cv2.CascadeClassifier(path) if os.path.isfile(path) else None
        if self._classifier is None or self._classifier.empty():
            raise AlchemyError("this OpenCV build ships no Haar face cascade", path,
                               "install opencv-python-headless, or use --detector yunet")
        self.min_neighbors, self.scale_factor, self.min_size = min_neighbors, scale_factor, min_size

    def detect(self, image: Image.Image) -> list[Face]:
        gray = np.asarray(to_rgb(image).convert("L"))
        side = max(1, int(min(gray.shape) * self.min_size))
        rows = self._classifier.detectMultiScale(gray, scaleFactor=self.scale_factor, minNeighbors=self.min_neighbors,
                                                 minSize=(side, side))
        return [Face(float(x), float(y), float(w), float(h), 1.0) for x, y, w, h in rows]
