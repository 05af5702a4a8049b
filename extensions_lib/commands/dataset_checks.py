"""`alchemy faces`, `alchemy watermark`, `alchemy detext`: dataset checks with their own models."""
from __future__ import annotations

import argparse
import importlib
import sys
from contextlib import contextmanager

from ..options import add_cli_arguments, from_cli


def register(subparsers) -> None:
    from ..faces.options import FaceModelOptions, FaceScanOptions

    p = subparsers.add_parser(
        "faces", help="count faces in every image (YuNet, anime YOLOv8 or Haar); flag or move by count",
        description="Detect faces in every image of DIR and write DIR/faces.jsonl (count, boxes, scores per image). "
                    "Images with fewer than --min-faces or more than --max-faces faces are flagged (listed) or "
                    "moved aside with their captions. Models: YuNet face_detection_yunet_2023mar.onnx (MIT, "
                    "opencv_zoo; --download fetches it into models/opencv), anime: face_detect_v1.4_s/model.onnx "
                    "from huggingface.co/deepghs/anime_face_detection (MIT).")
    p.add_argument("dir", metavar="DIR", help="folder of images")
    add_cli_arguments(p, FaceModelOptions)
    add_cli_arguments(p, FaceScanOptions)
    p.set_defaults(func=run_faces)
    for name in ("watermark", "detext"):  # registered by their own modules when present
        try:
            module = importlib.import_module(f"extensions_lib.{name}.cli")
        except ModuleNotFoundError as exc:
            if exc.name not in (f"extensions_lib.{name}.cli", f"extensions_lib.{name}"):
                raise
            continue
        module.register(subparsers)


def say(line: str) -> None:
    print(f"alchemy: {line}", file=sys.stderr)


@contextmanager
def progress_bar(desc: str):
    from tqdm import tqdm

    bars: list = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, unit="img", desc=desc, dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        yield progress
    finally:
        for bar in bars:
            bar.close()


def load_face_detector(opts):
    from ..faces.load import load_detector

    return load_detector(opts.detector, model=opts.model or None, models_dir=opts.models_dir, download=opts.download,
                         threshold=opts.threshold, report=say)


def run_faces(args: argparse.Namespace) -> int:
    from ..faces.options import FaceModelOptions, FaceScanOptions
    from ..faces.scan import count_histogram, scan_faces

    model_opts, scan_opts = from_cli(FaceModelOptions, args), from_cli(FaceScanOptions, args)
    detector = load_face_detector(model_opts)
    with progress_bar("faces") as progress:
        summary = scan_faces(args.dir, detector, scan_opts, progress=progress)
    for count, n in count_histogram(summary.records).items():
        print(f"{n} image(s) with {count} face(s)")
    for line in summary.lines("flagged"):
        print(line)
    for key in summary.flagged[:50]:
        print(f"  flagged {key}")
    return 0
