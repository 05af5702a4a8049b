"""`alchemy preprocess SRC DST [options]` (registered from extensions_lib/commands/dataset.py)."""
from __future__ import annotations

import argparse

from ..options import add_cli_arguments, from_cli
from .faces import detector_for
from .options import PreprocessOptions
from .run import preprocess_directory
from .tagging import add_tagger_arguments, caption_options_from_cli, model_source_from_cli, tagger_captioner


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "preprocess", help="resize, crop, split, flip and caption a folder of images for training",
        description="Turn SRC's images into a training folder DST, the way the WebUI's old Preprocess tab did: "
                    "outputs are named 00000-0-<name>.png with an optional .txt caption beside each.")
    parser.add_argument("src", metavar="SRC", help="folder of source images (never modified)")
    parser.add_argument("dst", metavar="DST", help="output folder (created; a re-run resumes where it stopped)")
    add_cli_arguments(parser, PreprocessOptions)
    add_tagger_arguments(parser)
    parser.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    options = from_cli(PreprocessOptions, args)
    source = model_source_from_cli(args)
    captioner, caption_id, closer = tagger_captioner(options.tagger_model, caption_options_from_cli(args),
                                                     models_dir=source.models_dir, download=source.download,
                                                     device=source.device, device_id=source.device_id,
                                                     report=lambda line: print(f"alchemy: {line}"))
    bar = tqdm(total=0, unit="img", dynamic_ncols=True)

    def progress(done: int, total: int, path) -> None:
        bar.total = total
        bar.n = done
        bar.set_postfix_str(path.name, refresh=False)
        bar.refresh()

    face_detector, face_notes = detector_for(options, report=lambda line: print(f"alchemy: {line}"))
    try:
        summary = preprocess_directory(args.src, args.dst, options, captioner=captioner, caption_id=caption_id,
                                       face_detector=face_detector, progress=progress)
    finally:
        bar.close()
        closer()
    summary.notes[:0] = face_notes
    for line in summary.lines():
        print(line)
    return 0
