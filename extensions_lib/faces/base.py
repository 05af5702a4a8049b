"""What every face detector returns, and how faces become focal points."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, Sequence

from PIL import Image

FACE_POINT_HEIGHT = 0.33  # the WebUI's focal point sits a third down the box (the eyes), not at its centre


@dataclass(frozen=True)
class Face:
    x: float
    y: float
    w: float
    h: float
    score: float
    landmarks: tuple[tuple[float, float], ...] = field(default=())

    @property
    def box(self) -> tuple[float, float, float, float]:
        return self.x, self.y, self.x + self.w, self.y + self.h

    def as_dict(self) -> dict:
        return {"box": [round(v, 1) for v in (self.x, self.y, self.w, self.h)], "score": round(self.score, 4)}


class FaceDetector(Protocol):
    def detect(self, image: Image.Image) -> list[Face]: ...


def face_points(detector: FaceDetector):
    """A focal-crop face callback (``preprocess.focal.FaceDetector``) over `detector`."""
    def points(image: Image.Image) -> list[tuple[float, float]]:
        return [(f.x + f.w / 2, f.y + f.h * FACE_POINT_HEIGHT) for f in detector.detect(image)]
    return points


def nms(boxes, scores, iou: float) -> list[int]:
    """Indices kept by greedy non-maximum suppression (boxes as x1, y1, x2, y2), best first."""
    import numpy as np

    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    order = list(np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable"))
    areas = np.clip(boxes[:, 2] - boxes[:, 0], 0, None) * np.clip(boxes[:, 3] - boxes[:, 1], 0, None)
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        if not order:
            break
        rest = np.array(order)
        w = np.clip(np.minimum(boxes[i, 2], boxes[rest, 2]) - np.maximum(boxes[i, 0], boxes[rest, 0]), 0, None)
        h = np.clip(np.minimum(boxes[i, 3], boxes[rest, 3]) - np.maximum(boxes[i, 1], boxes[rest, 1]), 0, None)
        inter = w * h
        union = areas[i] + areas[rest] - inter
        overlap = np.where(union > 0, inter / np.where(union > 0, union, 1), 0)
        order = [int(j) for j, o in zip(rest, overlap) if o <= iou]
    return keep


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB with transparency composited over white (what a dataset image shows)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def largest(faces: Sequence[Face]) -> Face | None:
    return max(faces, key=lambda f: f.w * f.h, default=None)
