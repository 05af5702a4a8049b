"""`alchemy detext` options, declared once."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..options import option
from .inpaint import METHODS


@dataclass
class DetextOptions:
    model: str = option("", help="PP-OCR detection model (ch_PP-OCRv4_det_infer.onnx, Apache-2.0); empty: the one "
                                 "inside an installed rapidocr-onnxruntime wheel, else models/ocr/", ui=False)
    box_threshold: float = option(0.5, help="keep a text box when the detector's mean probability inside it is at "
                                            "least this", minimum=0.0, maximum=1.0, step=0.05)
    passes: int = option(3, help="detect-and-inpaint rounds per image (stops early when no text is left)",
                         minimum=1, maximum=10)
    dilate: int = option(4, help="grow the text mask by this many pixels (covers anti-aliased edges)",
                         minimum=0, maximum=64)
    method: str = option("telea", help="OpenCV inpainting method", choices=list(METHODS))
    radius: int = option(5, help="inpainting neighbourhood radius in pixels", minimum=1, maximum=50)
    inpainter: str = option("opencv", help="opencv: fast, for captions and signatures on plain areas; model: a "
                                           "Stable Diffusion img2img inpaint of the masked area only (the WebUI's "
                                           "loaded model, or --ckpt on its own)", choices=["opencv", "model"])
    ckpt: Optional[Path] = option(None, help="checkpoint for --inpainter model outside the WebUI", ui=False)
    prompt: str = option("plain background", help="prompt for --inpainter model")
    strength: float = option(0.75, help="denoising strength for --inpainter model", minimum=0.05, maximum=1.0,
                             step=0.05)
    steps: int = option(20, help="sampling steps for --inpainter model", minimum=1, maximum=150)
    recursive: bool = option(False, help="also process images in sub-folders")
    copy_unchanged: bool = option(True, help="copy images without text (and all captions) to the output too, so "
                                             "it is a complete dataset")
    save_masks: bool = option(False, help="also write each text mask as <name>.mask.png")
    device: str = option("auto", help="where the detector runs", choices=["auto", "cpu", "cuda"])
