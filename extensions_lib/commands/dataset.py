"""Dataset commands: `alchemy tag` (booru tagger captions), `alchemy tags` (tag editor), `alchemy faces|watermark|
detext` (checks) and `alchemy preprocess` (when installed)."""
from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import AlchemyError
from ..options import add_cli_arguments, from_cli


def register(subparsers) -> None:
    _register_tag(subparsers)
    from . import dataset_checks, tags  # tag editor; faces, watermark and text checks

    tags.register(subparsers)
    dataset_checks.register(subparsers)
    # `preprocess` lives with the preprocessing code; its absence only hides that command.
    try:
        preprocess_cli = importlib.import_module("extensions_lib.preprocess.cli")
    except ModuleNotFoundError as exc:
        if exc.name not in ("extensions_lib.preprocess.cli", "extensions_lib.preprocess"):
            raise
        return
    preprocess_cli.register(subparsers)


def _register_tag(subparsers) -> None:
    from ..tagger.options import CaptionOptions, TagRunOptions

    parser = subparsers.add_parser(
        "tag", help="caption a folder of images with a WD14 (ONNX) or DeepDanbooru tagger",
        description="Write a booru-tag caption (.txt) for every image in DIR. Scores are cached, so re-running "
                    "with other thresholds or filters (and --existing-caption overwrite) does not run the model.")
    parser.add_argument("dir", metavar="DIR", help="folder of images")
    add_cli_arguments(parser, TagRunOptions)
    add_cli_arguments(parser, CaptionOptions)
    parser.add_argument("--list-models", action="store_true", help="list the models found and known, then exit")
    parser.set_defaults(func=run_tag)


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def run_tag(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..tagger import models as tagger_models
    from ..tagger.captions import check_options
    from ..tagger.options import CaptionOptions, TagRunOptions
    from ..tagger.run import format_summary, tag_directory

    run = from_cli(TagRunOptions, args)
    caption = check_options(from_cli(CaptionOptions, args))  # a bad /regex/ fails before the model loads
    models_dir = run.models_dir or tagger_models.DEFAULT_MODELS_DIR
    if args.list_models:
        for name, folder in tagger_models.list_models(models_dir).items():
            print(f"{name}\t{tagger_models.model_kind(folder)}\t{folder}")
        for key, known in tagger_models.KNOWN_MODELS.items():
            print(f"{key}\tknown (--download)\t{known.repo_id}@{known.revision[:10]}")
        return 0
    if not run.model:
        raise AlchemyError("no tagger model given", fix="pass --model FOLDER (model.onnx + selected_tags.csv)")
    folder = tagger_models.resolve_model(run.model, models_dir, download=run.download, report=_say)
    tagger = tagger_models.load_tagger(folder, device=run.device, device_id=run.device_id, report=_say)
    bars: list = []  # created on the first report, when the number of images is known

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, initial=done, unit="img", desc="tagging", dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    try:
        summary = tag_directory(args.dir, tagger, caption, run, progress=progress)
    finally:
        for bar in bars:
            bar.close()
        tagger.unload()
    print(format_summary(summary, run.summary_top))
    return 130 if summary.interrupted else 0
