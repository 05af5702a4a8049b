"""`alchemy caption` (composed captions: trigger words, tags, BLIP, CLIP terms) and `alchemy interrogate`
(CLIP-interrogator prompts)."""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..errors import AlchemyError
from ..options import add_cli_arguments, from_cli


def register(subparsers) -> None:
    from ..captioners.options import BlipOptions, CaptionRunOptions, ComposeOptions, InterrogateOptions
    from ..tagger.options import CaptionOptions

    caption = subparsers.add_parser(
        "caption", help="caption a folder: trigger words + tagger tags + a BLIP sentence + CLIP terms",
        description="Write a caption for every image in DIR, composed from the parts you ask for (BLIP sentence "
                    "with --blip-model, CLIP-interrogator terms with --clip-model, booru tags with --tagger-model) "
                    "under a CLIP-token budget. Models run one at a time; results are cached per image content, so "
                    "a re-run only works on new images.")
    caption.add_argument("dir", metavar="DIR", help="folder of images")
    add_cli_arguments(caption, CaptionRunOptions)
    add_cli_arguments(caption.add_argument_group("composing"), ComposeOptions)
    add_cli_arguments(caption.add_argument_group("BLIP"), BlipOptions)
    add_cli_arguments(caption.add_argument_group("CLIP interrogator"), InterrogateOptions)
    add_cli_arguments(caption.add_argument_group("tagger tags (with --tagger-model)"), CaptionOptions,
                      skip=("existing_caption", "trigger_tags", "separator"))
    caption.set_defaults(func=run_caption)

    interrogate = subparsers.add_parser(
        "interrogate", help="CLIP-interrogator prompts for an image or a folder",
        description="Print the CLIP-interrogator prompt of IMAGE, or write one for every image in a folder "
                    "(the BLIP sentence first when --blip-model is given). --clip-model sd1 is ViT-L/14 (SD1.x), "
                    "sd2 ViT-H/14 (SD2.x).")
    interrogate.add_argument("path", metavar="IMAGE_OR_DIR", help="an image file or a folder of images")
    add_cli_arguments(interrogate, CaptionRunOptions, skip=("tagger_model",))
    add_cli_arguments(interrogate.add_argument_group("CLIP interrogator"), InterrogateOptions)
    add_cli_arguments(interrogate.add_argument_group("BLIP"), BlipOptions)
    add_cli_arguments(interrogate.add_argument_group("writing (folders)"), ComposeOptions,
                      skip=("order", "trigger_words", "token_budget", "keep_first"))
    interrogate.set_defaults(func=run_interrogate)


def _say(line: str) -> None:
    print(line, file=sys.stderr)


def resolve_models(run, *, report=_say):
    """Paths of the models `run` names (downloading with --download)."""
    from ..captioners.models import DEFAULT_MODELS_DIR, clip_name, clip_weights_path, resolve_blip
    from ..captioners.run import Models
    from ..tagger.models import resolve_model

    models_dir = run.models_dir or DEFAULT_MODELS_DIR
    models = Models()
    if run.tagger_model:
        models.tagger = resolve_model(run.tagger_model, models_dir.parent / "tagger", download=run.download,
                                      report=report)
    if run.blip_model:
        models.blip = resolve_blip(run.blip_model, models_dir, download=run.download, report=report)
    if run.clip_path:
        models.clip = Path(run.clip_path)
        if not models.clip.exists():
            raise AlchemyError("CLIP weights not found", models.clip, "check --clip-path")
        # Unnamed weights get their file's name: label caches are then never mixed up with another model's
        # (name them, e.g. --clip-model ViT-L-14/openai, to share clip-interrogator's cache files).
        models.clip_name = clip_name(run.clip_model) if run.clip_model else (
            models.clip.stem if models.clip.is_file() else models.clip.name)
    elif run.clip_model:
        models.clip_name = clip_name(run.clip_model)
        models.clip = clip_weights_path(models.clip_name, models_dir, download=run.download, report=report)
    return models


def _progress_bar(desc: str):
    from tqdm import tqdm

    bars: list = []

    def progress(done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, initial=done, unit="step", desc=desc, dynamic_ncols=True))
        bars[0].update(done - bars[0].n)

    return progress, bars


def _run_folder(folder: Path, run, compose, blip, clip, tags, desc: str) -> int:
    from ..captioners.run import caption_directory
    from ..tagger import ModelSlot

    models = resolve_models(run)
    slot = ModelSlot()
    progress, bars = _progress_bar(desc)
    try:
        summary = caption_directory(folder, models, run, compose, slot=slot, blip_opts=blip, clip_opts=clip,
                                    tag_opts=tags, progress=progress, report=None)
    finally:
        for bar in bars:
            bar.close()
        slot.unload()
    print("\n".join(summary.lines()))
    return 130 if summary.interrupted else 0


def run_caption(args: argparse.Namespace) -> int:
    from ..captioners.options import BlipOptions, CaptionRunOptions, ComposeOptions, InterrogateOptions
    from ..tagger.captions import check_options
    from ..tagger.options import CaptionOptions

    run = from_cli(CaptionRunOptions, args)
    compose = from_cli(ComposeOptions, args)
    tags = check_options(from_cli(CaptionOptions, argparse.Namespace(
        **{k: v for k, v in vars(args).items() if k not in ("existing_caption", "separator")})))
    return _run_folder(Path(args.dir), run, compose, from_cli(BlipOptions, args), from_cli(InterrogateOptions, args),
                       tags, "captioning")


def run_interrogate(args: argparse.Namespace) -> int:
    from ..captioners.options import BlipOptions, CaptionRunOptions, ComposeOptions, InterrogateOptions

    run = from_cli(CaptionRunOptions, args)
    if not (run.clip_model or run.clip_path):
        run = dataclasses.replace(run, clip_model="sd1")
    clip = from_cli(InterrogateOptions, args)
    blip = from_cli(BlipOptions, args)
    path = Path(args.path)
    order = ["clip"] if clip.mode == "negative" else ["sentence", "clip"]
    compose = dataclasses.replace(from_cli(ComposeOptions, args), order=order, token_budget=clip.prompt_budget,
                                  keep_first=0)
    if path.is_dir():
        return _run_folder(path, run, compose, blip, clip, None, "interrogating")
    if not path.is_file():
        raise AlchemyError("not found", path, "give an image file or a folder")
    from ..captioners.run import caption_image
    from ..tagger import ModelSlot
    from ..tagger.image_io import ImageSkipped, decode_image

    try:
        image = decode_image(path, max_pixels=run.max_pixels)
    except ImageSkipped as exc:
        raise AlchemyError(f"not readable as an image: {exc.reason}", path, "give an image file") from None
    slot = ModelSlot()
    try:
        print(caption_image(image, resolve_models(run), run, compose, slot=slot, blip_opts=blip, clip_opts=clip))
    finally:
        slot.unload()
    return 0
