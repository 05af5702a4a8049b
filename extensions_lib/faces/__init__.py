"""Face detectors for focal-point and face-centred crops and for face-count metadata.

`yunet` (OpenCV's FaceDetectorYN, photos) and `anime` (a YOLOv8 ONNX through onnxruntime, drawings)
share one interface: ``detect(image: PIL.Image) -> list[Face]``. Models live in a models folder
(``models/opencv`` for YuNet, as the WebUI keeps it) and are found or fetched by :mod:`.models`.
"""
from .base import Face, FaceDetector, face_points

__all__ = ["Face", "FaceDetector", "face_points"]
