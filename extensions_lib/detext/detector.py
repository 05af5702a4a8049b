"""PP-OCR's DB text detector run by onnxruntime, with PaddleOCR's pre- and post-processing.

Settings are rapidocr-onnxruntime 1.4.4's (config.yaml): the short side scaled up to 736 (``limit_type
min``), the long side capped at 2000, both rounded to multiples of 32; BGR, (x/255 - 0.5)/0.5; the
probability map thresholded at 0.3 and dilated (2 x 2); a candidate kept when the mean probability
inside its box is at least 0.5; boxes grown by ``area * 1.6 / perimeter`` on every side (the DB
"unclip"), here on the minimum-area rectangle, which is what an axis-free text mask needs.

The model: ``ch_PP-OCRv4_det_infer.onnx`` (Apache-2.0), shipped inside the ``rapidocr-onnxruntime``
wheel; found there when that package is installed (``pip install --no-deps rapidocr-onnxruntime==1.4.4``
is enough: only the file is used), else in ``models/ocr/``, else give ``--model``.
"""
from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import AlchemyError

MODEL_NAME = "ch_PP-OCRv4_det_infer.onnx"
LIMIT_SIDE = 736
MAX_SIDE = 2000
THRESH = 0.3
BOX_THRESH = 0.5
UNCLIP = 1.6
MIN_SIZE = 3
MAX_CANDIDATES = 1000


def find_model(model: str | os.PathLike | None = None, models_dir: str | os.PathLike | None = None) -> Path:
    if model:
        path = Path(model).expanduser()
        if not path.is_file():
            raise AlchemyError("text detector model not found", path, f"give the path of {MODEL_NAME}")
        return path
    try:
        for entry in importlib.metadata.files("rapidocr-onnxruntime") or []:
            if entry.name == MODEL_NAME:
                return Path(entry.locate())
    except importlib.metadata.PackageNotFoundError:
        pass
    local = Path(models_dir or "models") / "ocr" / MODEL_NAME
    if local.is_file():
        return local
    raise AlchemyError("text detector model not found", local,
                       f"pip install --no-deps rapidocr-onnxruntime==1.4.4 (it ships {MODEL_NAME}), "
                       "or put the file there, or pass --model")


@dataclass(frozen=True)
class TextBox:
    points: tuple[tuple[float, float], ...]  # 4 corners in image pixels
    score: float


def input_size(width: int, height: int) -> tuple[int, int]:
    """The network input (width, height) for an image of this size."""
    ratio = LIMIT_SIDE / min(width, height) if min(width, height) < LIMIT_SIDE else 1.0
    if max(width, height) * ratio > MAX_SIDE:
        ratio = MAX_SIDE / max(width, height)
    return max(32, int(round(width * ratio / 32)) * 32), max(32, int(round(height * ratio / 32)) * 32)


class DbTextDetector:
    def __init__(self, model: str | os.PathLike, *, device: str = "auto", device_id: int = 0, report=None,
                 box_thresh: float = BOX_THRESH, unclip: float = UNCLIP):
        import onnxruntime

        from ..faces.yunet import import_cv2
        from ..tagger.providers import check_session, plan_providers

        self._cv2 = import_cv2()
        plan = plan_providers(device, device_id)
        try:
            self._session = onnxruntime.InferenceSession(os.fspath(model), providers=plan.providers)
        except Exception as exc:
            raise AlchemyError(f"onnxruntime could not load this model ({exc})", model,
                               f"give PP-OCR's detection model ({MODEL_NAME})") from None
        for line in plan.notes + check_session(self._session, plan):
            if report:
                report(line)
        self._input = self._session.get_inputs()[0].name
        self.box_thresh, self.unclip = box_thresh, unclip

    def probability(self, bgr: np.ndarray) -> np.ndarray:
        """The DB probability map (at the network input size)."""
        cv2 = self._cv2
        height, width = bgr.shape[:2]
        in_w, in_h = input_size(width, height)
        x = cv2.resize(bgr, (in_w, in_h)).astype(np.float32) / 255.0
        x = (x - 0.5) / 0.5
        return self._session.run(None, {self._input: x.transpose(2, 0, 1)[None]})[0][0, 0]

    def detect(self, image: Image.Image) -> list[TextBox]:
        from ..faces.yunet import rgb_to_bgr

        bgr = rgb_to_bgr(image)
        prob = self.probability(bgr)
        return self.boxes(prob, bgr.shape[1], bgr.shape[0])

    def boxes(self, prob: np.ndarray, width: int, height: int) -> list[TextBox]:
        cv2 = self._cv2
        bitmap = (prob > THRESH).astype(np.uint8)
        bitmap = cv2.dilate(bitmap, np.ones((2, 2), np.uint8))
        contours, _ = cv2.findContours(bitmap * 255, cv2.RETR_LIST, cv2.CHAIN_APPROX_SIMPLE)
        sx, sy = width / prob.shape[1], height / prob.shape[0]
        out = []
        for contour in contours[:MAX_CANDIDATES]:
            (cx, cy), (w, h), angle = cv2.minAreaRect(contour)
            if min(w, h) < MIN_SIZE:
                continue
            score = self._box_score(prob, contour)
            if score < self.box_thresh:
                continue
            grow = w * h * self.unclip / (2 * (w + h)) if w + h > 0 else 0.0
            w, h = w + 2 * grow, h + 2 * grow
            if min(w, h) < MIN_SIZE + 2:
                continue
            corners = cv2.boxPoints(((cx, cy), (w, h), angle))
            points = tuple((float(np.clip(px * sx, 0, width)), float(np.clip(py * sy, 0, height))) for px, py in corners)
            out.append(TextBox(points, float(score)))
        return out

    def _box_score(self, prob: np.ndarray, contour) -> float:
        """Mean probability inside the contour's box (PaddleOCR's "fast" score)."""
        cv2 = self._cv2
        x, y, w, h = cv2.boundingRect(contour)
        box = cv2.boxPoints(cv2.minAreaRect(contour))
        mask = np.zeros((h, w), np.uint8)
        cv2.fillPoly(mask, [np.round(box - (x, y)).astype(np.int32)], 1)
        region = prob[y:y + h, x:x + w]
        return float(cv2.mean(region, mask[:region.shape[0], :region.shape[1]])[0]) if mask.any() else 0.0
