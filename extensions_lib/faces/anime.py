"""Anime faces: a YOLOv8 detector exported to ONNX (deepghs/anime_face_detection), run by onnxruntime.

Pre/post-processing as its authors run it: the image is scaled so its long side is at most the model's
``imgsz`` (read from the ONNX metadata; 640 when absent), each side rounded up to a multiple of 32,
fed as RGB/255 NCHW to ``images``; ``output0`` is (1, 4 + classes, N) with centre-x, centre-y, width,
height in the scaled image and one score per class; boxes over the threshold go through NMS (IoU 0.7)
and are mapped back to the original image.
"""
from __future__ import annotations

import ast
import json
import math
import os

import numpy as np
from PIL import Image

from ..errors import AlchemyError
from .base import Face, nms, to_rgb

CONF_THRESHOLD = 0.25
IOU_THRESHOLD = 0.7
DEFAULT_SIZE = 640
ALIGN = 32


def scaled_size(width: int, height: int, max_size: int) -> tuple[int, int]:
    ratio = max_size / max(width, height)
    if ratio < 1:
        width, height = width * ratio, height * ratio
    return int(math.ceil(width / ALIGN) * ALIGN), int(math.ceil(height / ALIGN) * ALIGN)


def _class_names(meta: dict) -> dict[int, str]:
    text = meta.get("names")
    if not text:
        return {0: "face"}
    try:
        names = ast.literal_eval(text)  # a dict literal of ints and strings; literal_eval runs no code
    except (ValueError, SyntaxError):
        return {0: "face"}
    return {int(k): str(v) for k, v in names.items()} if isinstance(names, dict) else {0: "face"}


class AnimeFaceDetector:
    def __init__(self, model: str | os.PathLike, *, conf_threshold: float = CONF_THRESHOLD,
                 iou_threshold: float = IOU_THRESHOLD, device: str = "auto", device_id: int = 0, report=None):
        import onnxruntime

        from ..tagger.providers import check_session, plan_providers

        if not os.path.isfile(model):
            raise AlchemyError("anime face model not found", model,
                               "put face_detect_v1.4_s/model.onnx from huggingface.co/deepghs/anime_face_detection "
                               "there, or pass its path")
        plan = plan_providers(device, device_id)
        try:
            self._session = onnxruntime.InferenceSession(os.fspath(model), providers=plan.providers)
        except Exception as exc:  # onnxruntime raises its own exception types for bad files
            raise AlchemyError(f"onnxruntime could not load this model ({exc})", model,
                               "give a YOLOv8 detector exported to ONNX") from None
        for line in plan.notes + check_session(self._session, plan):
            if report:
                report(line)
        meta = self._session.get_modelmeta().custom_metadata_map
        try:
            self.max_size = int(max(json.loads(meta.get("imgsz", "[]")) or [DEFAULT_SIZE]))
        except (ValueError, TypeError):
            self.max_size = DEFAULT_SIZE
        self.names = _class_names(meta)
        self.conf_threshold = conf_threshold
        self.iou_threshold = iou_threshold
        self._input = self._session.get_inputs()[0].name

    def detect(self, image: Image.Image) -> list[Face]:
        rgb = to_rgb(image)
        width, height = rgb.size
        new_w, new_h = scaled_size(width, height, self.max_size)
        data = np.asarray(rgb.resize((new_w, new_h), Image.BICUBIC), dtype=np.float32) / 255.0
        output = self._session.run(None, {self._input: data.transpose(2, 0, 1)[None]})[0][0]
        scores = output[4:].max(axis=0)
        keep = scores > self.conf_threshold
        if not keep.any():
            return []
        cx, cy, w, h = output[:4, keep]
        boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)
        kept_scores = scores[keep]
        sx, sy = width / new_w, height / new_h
        faces = []
        for i in nms(boxes, kept_scores, self.iou_threshold):
            x1, y1, x2, y2 = boxes[i]
            x1, x2 = (float(np.clip(v * sx, 0, width)) for v in (x1, x2))
            y1, y2 = (float(np.clip(v * sy, 0, height)) for v in (y1, y2))
            faces.append(Face(x1, y1, x2 - x1, y2 - y1, float(kept_scores[i])))
        return faces
