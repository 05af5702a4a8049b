"""Auto focal-point crop: crop around what is interesting instead of the centre.

Same shape as the WebUI's `autocrop.crop_image`: scale the image so it just covers the target, find
points of interest of three kinds (faces, the most detailed window, corners), average each kind to a
centroid, blend the centroids by their weights, and centre the crop on the result, clamped to the
image. Differences, on purpose:
- no OpenCV needed: corners are Shi-Tomasi corners computed with numpy, and "entropy" is the Shannon
  entropy of the 8-bit luminance histogram (the WebUI summed -log2(p) of a dithered 1-bit image,
  which is not an entropy and favours windows where one colour is rare);
- faces come from an injectable detector; the default uses OpenCV's bundled Haar cascade when cv2
  is importable, never a download. Without one the face weight simply has no points to pull;
- the image is scaled to *cover* the target (the WebUI matched the short side only, which left the
  crop hanging outside the image when the target was more elongated than the image).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
from PIL import Image, ImageDraw

Point = tuple[float, float]
FaceDetector = Callable[[Image.Image], Sequence[Point]]

ENTROPY_STEP = 4          # window stride in pixels, as the WebUI
MAX_CORNERS = 100         # goodFeaturesToTrack settings the WebUI used
CORNER_QUALITY = 0.04
CORNER_MIN_DISTANCE = 0.06  # fraction of the short side
WATERMARK_BAND = 0.9      # corners below this fraction of the height are ignored (watermarks)


@dataclass(frozen=True)
class FocalWeights:
    face: float = 0.9
    entropy: float = 0.15
    edges: float = 0.5


@dataclass
class FocalCrop:
    image: Image.Image                    # target-sized crop
    scaled: Image.Image                   # the covering image it was cut from
    box: tuple[int, int, int, int]        # (left, top, right, bottom) in `scaled`
    focus: tuple[int, int]
    points: dict[str, list[Point]] = field(default_factory=dict)  # per kind, for the debug image


def cover_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """Smallest size with the image's aspect ratio that covers the target (one side matches exactly)."""
    if target_w / width >= target_h / height:
        return target_w, max(target_h, round(height * target_w / width))
    return max(target_w, round(width * target_h / height)), target_h


def window_entropies(gray: np.ndarray, window: int, step: int = ENTROPY_STEP) -> tuple[np.ndarray, np.ndarray]:
    """Shannon entropy (bits) of every `window`-column-wide slab of `gray`, at starts 0, step, ... and the end.

    Column histograms are summed once, so each window costs 256 subtractions instead of a pass over
    its pixels.
    """
    height, width = gray.shape
    cols = np.arange(width, dtype=np.int64)[None, :]
    per_col = np.bincount((gray.astype(np.int64) + 256 * cols).ravel(), minlength=256 * width)
    cumulative = np.zeros((width + 1, 256), dtype=np.int64)
    np.cumsum(per_col.reshape(width, 256), axis=0, out=cumulative[1:])
    starts = np.arange(0, width - window + 1, step)
    if starts[-1] != width - window:
        starts = np.append(starts, width - window)
    counts = (cumulative[starts + window] - cumulative[starts]).astype(np.float64)
    total = float(window * height)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(counts > 0, counts * np.log2(counts), 0.0)
    return starts, np.log2(total) - terms.sum(axis=1) / total


def entropy_point(gray: np.ndarray, crop_w: int, crop_h: int) -> Point | None:
    """Centre of the crop-sized window with the highest entropy along the long axis (None: nothing to slide)."""
    height, width = gray.shape
    if width > crop_w:
        starts, entropy = window_entropies(gray, crop_w)
        return float(starts[int(np.argmax(entropy))] + crop_w / 2), height / 2
    if height > crop_h:
        starts, entropy = window_entropies(np.ascontiguousarray(gray.T), crop_h)
        return width / 2, float(starts[int(np.argmax(entropy))] + crop_h / 2)
    return None


def _filter3(a: np.ndarray, kernel_x: Sequence[float], kernel_y: Sequence[float]) -> np.ndarray:
    """Separable 3x3 filter with reflect-101 borders (OpenCV's default)."""
    p = np.pad(a, 1, mode="reflect")
    rows = kernel_y[0] * p[:-2] + kernel_y[1] * p[1:-1] + kernel_y[2] * p[2:]
    return kernel_x[0] * rows[:, :-2] + kernel_x[1] * rows[:, 1:-1] + kernel_x[2] * rows[:, 2:]


def min_eigenvalues(gray: np.ndarray) -> np.ndarray:
    """Smaller eigenvalue of the 3x3-summed gradient structure tensor (Shi-Tomasi corner strength)."""
    g = gray.astype(np.float64)
    dx = _filter3(g, (-1, 0, 1), (1, 2, 1))
    dy = _filter3(g, (1, 2, 1), (-1, 0, 1))
    box = (1, 1, 1)
    a, b, c = _filter3(dx * dx, box, box), _filter3(dx * dy, box, box), _filter3(dy * dy, box, box)
    return (a + c) / 2 - np.sqrt(((a - c) / 2) ** 2 + b * b)


def corner_points(gray: np.ndarray, *, max_corners: int = MAX_CORNERS, quality: float = CORNER_QUALITY,
                  min_distance: float | None = None) -> list[Point]:
    """Strongest corners, each at least `min_distance` from a stronger one (goodFeaturesToTrack's rule)."""
    height, width = gray.shape
    if min_distance is None:
        min_distance = min(width, height) * CORNER_MIN_DISTANCE
    masked = gray.copy()
    masked[int(height * WATERMARK_BAND):] = 153  # the WebUI's grey band over likely watermarks
    strength = min_eigenvalues(masked)
    peak = strength.max()
    if peak <= 0:
        return []
    strength[strength <= peak * quality] = 0
    padded = np.pad(strength, 1, mode="constant")
    local_max = np.max([padded[dy:dy + height, dx:dx + width] for dy in range(3) for dx in range(3)], axis=0)
    ys, xs = np.nonzero((strength > 0) & (strength == local_max))
    order = np.lexsort((xs, ys, -strength[ys, xs]))  # strongest first; ties in reading order
    remaining = np.stack([xs[order], ys[order]], axis=1).astype(np.float64)
    chosen: list[Point] = []
    while len(remaining) and len(chosen) < max_corners:
        x, y = remaining[0]
        chosen.append((float(x), float(y)))
        remaining = remaining[((remaining - (x, y)) ** 2).sum(axis=1) >= min_distance ** 2]
    return chosen


def centroid(points: Sequence[Point]) -> Point:
    return sum(p[0] for p in points) / len(points), sum(p[1] for p in points) / len(points)


def weighted_focus(groups: Sequence[tuple[Sequence[Point], float]], fallback: Point) -> tuple[int, int]:
    """Blend the centroid of each non-empty group by its weight (weights renormalised over those present)."""
    present = [(centroid(points), weight) for points, weight in groups if points and weight > 0]
    total = sum(weight for _, weight in present)
    if total <= 0:
        return round(fallback[0]), round(fallback[1])
    x = sum(c[0] * weight for c, weight in present) / total
    y = sum(c[1] * weight for c, weight in present) / total
    return round(x), round(y)


def crop_box(focus: tuple[int, int], size: tuple[int, int], crop: tuple[int, int]) -> tuple[int, int, int, int]:
    """Crop of size `crop` centred on `focus`, shifted back inside an image of size `size`."""
    (fx, fy), (width, height), (cw, ch) = focus, size, crop
    left = min(max(fx - cw // 2, 0), width - cw)
    top = min(max(fy - ch // 2, 0), height - ch)
    return left, top, left + cw, top + ch


def focal_crop(img: Image.Image, target_w: int, target_h: int, weights: FocalWeights = FocalWeights(), *,
               face_detector: FaceDetector | None = None) -> FocalCrop:
    """Crop `img` (RGB) to target_w x target_h around its weighted point of interest."""
    scaled = img.resize(cover_size(img.width, img.height, target_w, target_h), resample=Image.BICUBIC)
    gray = np.asarray(scaled.convert("L"))
    points: dict[str, list[Point]] = {}
    if weights.face > 0 and face_detector is not None:
        points["face"] = list(face_detector(scaled))
    if weights.entropy > 0:
        point = entropy_point(gray, target_w, target_h)
        points["entropy"] = [point] if point is not None else []
    if weights.edges > 0:
        points["edges"] = corner_points(gray)
    kinds = {"face": weights.face, "entropy": weights.entropy, "edges": weights.edges}
    focus = weighted_focus([(pts, kinds[kind]) for kind, pts in points.items()],
                           fallback=(scaled.width / 2, scaled.height / 2))
    box = crop_box(focus, scaled.size, (target_w, target_h))
    return FocalCrop(image=scaled.crop(box), scaled=scaled, box=box, focus=focus, points=points)


_COLOURS = {"face": "#F00", "entropy": "#FF0", "edges": "#00F"}


def debug_image(result: FocalCrop) -> Image.Image:
    """The covering image annotated: points per kind, their centroids, the focus and the crop (green)."""
    out = result.scaled.copy()
    draw = ImageDraw.Draw(out)
    radius = max(2, int(min(out.size) * 0.035))
    for kind, pts in result.points.items():
        colour = _COLOURS[kind]
        for x, y in pts:
            draw.rectangle((x - 2, y - 2, x + 2, y + 2), outline=colour)
        if pts:
            cx, cy = centroid(pts)
            draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=colour)
            draw.text((cx - radius, cy - radius - 12), kind, fill=colour)
    fx, fy = result.focus
    draw.ellipse((fx - radius, fy - radius, fx + radius, fy + radius), outline="#0F0")
    left, top, right, bottom = result.box
    draw.rectangle((left, top, right - 1, bottom - 1), outline="#0F0")
    return out


def opencv_face_detector() -> FaceDetector | None:
    """A face detector from OpenCV's bundled Haar cascade, or None when OpenCV is not installed.

    Only files shipped inside the cv2 package are used: nothing is downloaded.
    """
    try:
        import cv2  # optional: not a dependency
    except ImportError:
        return None
    cascade_dir = getattr(getattr(cv2, "data", None), "haarcascades", "")
    path = os.path.join(cascade_dir, "haarcascade_frontalface_default.xml")
    if not os.path.isfile(path):
        return None
    classifier = cv2.CascadeClassifier(path)
    if classifier.empty():
        return None

    def detect(img: Image.Image) -> list[Point]:
        gray = np.asarray(img.convert("L"))
        side = max(1, int(min(img.size) * 0.05))
        faces = classifier.detectMultiScale(gray, scaleFactor=1.1, minNeighbors=7, minSize=(side, side))
        return [(x + w / 2, y + h / 2) for x, y, w, h in faces]

    return detect
