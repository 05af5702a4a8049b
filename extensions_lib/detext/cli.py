"""`alchemy detext SRC DST` (registered from extensions_lib/commands/dataset_checks.py)."""
from __future__ import annotations

import argparse

from ..options import add_cli_arguments, from_cli
from .options import DetextOptions


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "detext", help="find text in images (PP-OCR detector) and paint it out (OpenCV inpainting) into a new folder",
        description="Detect text regions in every image of SRC with PP-OCR's DB detector (onnxruntime; the model "
                    "ships in the rapidocr-onnxruntime wheel, Apache-2.0), inpaint them with OpenCV and write the "
                    "results to DST (PNG; only the masked pixels change). SRC is never written. DST/detext.jsonl "
                    "lists the boxes found per image.")
    p.add_argument("src", metavar="SRC", help="folder of images (never modified)")
    p.add_argument("dst", metavar="DST", help="output folder")
    add_cli_arguments(p, DetextOptions)
    p.set_defaults(func=run_detext)


def run_detext(args: argparse.Namespace) -> int:
    from ..commands.dataset_checks import progress_bar, say
    from .detector import DbTextDetector, find_model
    from .run import detext_folder

    options = from_cli(DetextOptions, args)
    detector = DbTextDetector(find_model(options.model or None), device=options.device, report=say,
                              box_thresh=options.box_threshold)
    inpainter = None
    if options.inpainter == "model":
        if options.ckpt is None:
            from ..errors import AlchemyError

            raise AlchemyError("--inpainter model needs a checkpoint", fix="pass --ckpt path/to/model.safetensors")
        import torch

        from ..backend.standalone import load_model
        from .run import model_inpainter

        device = options.device if options.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
        inpainter = model_inpainter(load_model(options.ckpt, device=device), options)
    with progress_bar("detext") as progress:
        summary = detext_folder(args.src, args.dst, detector, options, inpainter=inpainter, progress=progress)
    for line in summary.lines("had text"):
        print(line)
    return 0
