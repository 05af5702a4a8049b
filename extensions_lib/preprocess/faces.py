"""Faces for preprocessing: which detector a run uses, and the face-centred crop."""
from __future__ import annotations

from typing import Callable

from PIL import Image

from ..errors import AlchemyError
from ..faces.base import Face, largest
from .options import PreprocessOptions


def needs_faces(options: PreprocessOptions) -> bool:
    return options.face_crop or (options.focal_crop and options.focal_face_weight > 0)


def detector_for(options: PreprocessOptions, *, models_dir=None,
                 report: Callable[[str], None] | None = None) -> tuple[object | None, list[str]]:
    """(the detector the options ask for, notes for the summary). YuNet without its model file falls back to
    the Haar cascade, said in the notes; None (with a note) when OpenCV itself is missing."""
    from ..faces.load import load_detector

    if not needs_faces(options):
        return None, []
    try:
        return load_detector(options.face_detector, model=options.face_model or None, models_dir=models_dir,
                             report=report), []
    except AlchemyError as exc:
        if options.face_detector != "yunet" or options.face_model:
            raise
        note = f"face detector yunet unavailable ({exc.message})"
    try:
        return load_detector("haar"), [note + "; used OpenCV's Haar cascade instead"]
    except AlchemyError as exc:
        return None, [note + f"; no fallback either ({exc.message}): faces were not used"]


def face_crop(img: Image.Image, face: Face, width: int, height: int, scale: float) -> Image.Image:
    """A width x height crop centred on `face`, covering `scale` times the face's size where the image allows."""
    crop_h = max(face.h * scale, face.w * scale * height / width)
    crop_w = crop_h * width / height
    fit = min(1.0, img.width / crop_w, img.height / crop_h)
    crop_w, crop_h = crop_w * fit, crop_h * fit
    cx, cy = face.x + face.w / 2, face.y + face.h / 2
    left = min(max(cx - crop_w / 2, 0.0), img.width - crop_w)
    top = min(max(cy - crop_h / 2, 0.0), img.height - crop_h)
    box = (round(left), round(top), round(left + crop_w), round(top + crop_h))
    return img.resize((width, height), Image.LANCZOS, box=box)


def largest_face(detector, img: Image.Image) -> Face | None:
    return largest(detector.detect(img))
