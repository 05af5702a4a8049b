"""OpenCV YuNet (``cv2.FaceDetectorYN``), with the channel order the model was trained on.

The model takes OpenCV's native BGR. The WebUI's autocrop handed it the RGB array it had from PIL, so
red and blue were swapped on the way in and faces scored lower than they should; we convert
(regression test in tests/test_faces.py). Settings are the WebUI's: score 0.9, NMS 0.3, top-k 5000,
input size = the image's size.
"""
from __future__ import annotations

import os
import threading

import numpy as np
from PIL import Image

from ..errors import AlchemyError
from .base import Face, to_rgb

SCORE_THRESHOLD = 0.9
NMS_THRESHOLD = 0.3
TOP_K = 5000


def import_cv2():
    try:
        import cv2
    except ImportError:
        raise AlchemyError("OpenCV is not installed", fix="pip install opencv-python-headless (the WebUI already "
                                                          "has opencv-python)") from None
    if not hasattr(cv2, "FaceDetectorYN"):
        raise AlchemyError(f"OpenCV {cv2.__version__} has no FaceDetectorYN", fix="upgrade OpenCV to 4.8 or newer")
    return cv2


def rgb_to_bgr(image: Image.Image) -> np.ndarray:
    """The contiguous BGR uint8 array OpenCV models expect, from a PIL image of any mode."""
    return np.ascontiguousarray(np.asarray(to_rgb(image))[:, :, ::-1])


class YuNetDetector:
    def __init__(self, model: str | os.PathLike, *, score_threshold: float = SCORE_THRESHOLD,
                 nms_threshold: float = NMS_THRESHOLD, top_k: int = TOP_K):
        cv2 = import_cv2()
        if not os.path.isfile(model):
            raise AlchemyError("YuNet model file not found", model, "see `alchemy faces --help` for where to get it")
        try:
            self._net = cv2.FaceDetectorYN.create(os.fspath(model), "", (320, 320), score_threshold,
                                                  nms_threshold, top_k)
        except cv2.error as exc:
            reason = [line for line in str(exc).splitlines() if "error:" in line][-1:] or [str(exc)]
            raise AlchemyError(f"OpenCV could not load this YuNet model ({reason[0].strip()})", model,
                               "use face_detection_yunet_2023mar.onnx with OpenCV >= 4.8") from None
        self._lock = threading.Lock()  # the detector keeps its input size as state

    def detect(self, image: Image.Image) -> list[Face]:
        bgr = rgb_to_bgr(image)
        height, width = bgr.shape[:2]
        with self._lock:
            self._net.setInputSize((width, height))
            _, rows = self._net.detect(bgr)
        faces = []
        for row in (rows if rows is not None else []):
            x, y, w, h = (float(v) for v in row[:4])
            marks = tuple((float(row[4 + 2 * i]), float(row[5 + 2 * i])) for i in range(5))
            faces.append(Face(x, y, w, h, float(row[14]), marks))
        return faces
