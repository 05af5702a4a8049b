"""`alchemy watermark DIR` (registered from extensions_lib/commands/dataset_checks.py)."""
from __future__ import annotations

import argparse

from ..options import add_cli_arguments, from_cli
from .options import WatermarkOptions


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "watermark", help="score watermarks (LAION classifier); flag or move aside the watermarked images",
        description="Score every image in DIR with LAION's watermark classifier (EfficientNet-B3; "
                    "watermark_model_v1.pt from github.com/LAION-AI/LAION-5B-WatermarkDetection, MIT) and write "
                    "DIR/watermarks.jsonl. Images scoring at least --threshold are flagged (listed) or moved aside "
                    "with their captions. Scores are cached, so a re-run with another threshold is instant.")
    p.add_argument("dir", metavar="DIR", help="folder of images")
    add_cli_arguments(p, WatermarkOptions)
    p.set_defaults(func=run_watermark)


def run_watermark(args: argparse.Namespace) -> int:
    from ..commands.dataset_checks import progress_bar
    from .model import WatermarkClassifier
    from .scan import DEFAULT_MODEL, scan_watermarks

    options = from_cli(WatermarkOptions, args)
    classifier = WatermarkClassifier(options.model or DEFAULT_MODEL, device=options.device)
    with progress_bar("watermarks") as progress:
        summary = scan_watermarks(args.dir, classifier, options, progress=progress)
    for line in summary.lines(f"scored >= {options.threshold:g}"):
        print(line)
    for key in summary.flagged[:50]:
        print(f"  flagged {key}")
    return 0
