"""LAION-5B-WatermarkDetection's classifier: timm EfficientNet-B3 with an MLP head.

Facts (LAION-AI/LAION-5B-WatermarkDetection @ d8786e3): ``efficientnet_b3a`` (timm 1.x builds it as
``efficientnet_b3``, the same network) whose classifier is Linear(1536, 625), ReLU, Dropout(0.3),
Linear(625, 256), ReLU, Linear(256, 2); weights ``watermark_model_v1.pt`` (a state_dict). Input: the
image squashed to 256 x 256, RGB, ImageNet mean/std. Softmax index 0 is P(watermark); LAION-5B's
``pwatermark`` and SD v1's data filter (< 0.5) use it. The pickle goes through the restricted loader;
a ``.safetensors`` copy loads too. ImageNet weights are never fetched (``pretrained=False``).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import AlchemyError
from ..weights_file import read_state_dict

SIZE = 256
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
WATERMARK_INDEX = 0
FILENAME = "watermark_model_v1.pt"
SOURCE = "https://github.com/LAION-AI/LAION-5B-WatermarkDetection (models/watermark_model_v1.pt, MIT)"


def build_model(backbone: str = "efficientnet_b3"):
    """The classifier with random weights (load a state_dict into it)."""
    import timm
    import torch.nn as nn

    model = timm.create_model(backbone, pretrained=False)
    model.classifier = nn.Sequential(nn.Linear(model.classifier.in_features, 625), nn.ReLU(), nn.Dropout(p=0.3),
                                     nn.Linear(625, 256), nn.ReLU(), nn.Linear(256, 2))
    return model


def preprocess(images: list[Image.Image]):
    """(N, 3, 256, 256) float tensor: squashed, RGB, ImageNet-normalised (as the LAION repo's transforms)."""
    import torch

    from ..faces.base import to_rgb

    arrays = [(np.asarray(to_rgb(im).resize((SIZE, SIZE), Image.BILINEAR), dtype=np.float32) / 255.0 - MEAN) / STD
              for im in images]
    return torch.from_numpy(np.stack(arrays).transpose(0, 3, 1, 2).copy())


def corner_crops(image: Image.Image, fraction: float = 0.5) -> list[Image.Image]:
    """The four corners, each `fraction` of the width and height: small watermarks sit in corners, and the
    classifier misses them at full-image scale (LAION-5B-WatermarkDetection#6)."""
    w, h = image.size
    cw, ch = max(1, round(w * fraction)), max(1, round(h * fraction))
    return [image.crop(box) for box in ((0, 0, cw, ch), (w - cw, 0, w, ch), (0, h - ch, cw, h), (w - cw, h - ch, w, h))]


class WatermarkClassifier:
    def __init__(self, path: str | os.PathLike, *, device: str = "auto"):
        import torch

        path = Path(path)
        if not path.is_file():
            raise AlchemyError("watermark model not found", path, f"put {FILENAME} from {SOURCE} there")
        model = build_model()
        state = read_state_dict(path, "not a state_dict", f"use watermark_model_v1.pt from {SOURCE}")
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise AlchemyError(f"not the LAION watermark classifier ({len(missing)} weights missing, e.g. "
                               f"{(missing or unexpected)[0]!r}; {len(unexpected)} unexpected)", path,
                               f"use {FILENAME} from {SOURCE}")
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.model_id = f"laion-watermark-{_file_id(path)}"

    def scores(self, images: list[Image.Image]) -> np.ndarray:
        """P(watermark) per image."""
        import torch

        with torch.inference_mode():
            logits = self.model(preprocess(images).to(self.device))
            return torch.softmax(logits.float(), dim=1)[:, WATERMARK_INDEX].cpu().numpy()

    def score(self, image: Image.Image, corners: bool = False) -> tuple[float, list[float]]:
        """(score, [full, corner scores...]): the score is the maximum when corners are checked too."""
        parts = self.scores([image] + (corner_crops(image) if corners else []))
        return float(parts.max()), [float(p) for p in parts]

    def unload(self) -> None:
        self.model = None


def _file_id(path: Path) -> str:
    import hashlib

    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
