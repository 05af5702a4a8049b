"""Captioning preprocessed images with the tagger package, through its public API only.

The tagger's caption options (thresholds, filters, layout...) are declared once in
`extensions_lib.tagger.options.CaptionOptions` and reused here as flags; only its existing-caption
policy is left out, because preprocessing has its own (the WebUI's ignore/copy/prepend/append). The
options saying where the model comes from and runs (--models-dir, --download, --device, --device-id)
are `alchemy tag`'s own declarations in `TagRunOptions`, offered here unchanged.
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Callable

from ..options import add_cli_arguments, from_cli, specs, to_dict
from ..tagger import CaptionOptions, TagRunOptions, caption_images, load_tagger, resolve_model
from ..tagger.captions import check_options
from ..tagger.options import MODEL_SOURCE_OPTIONS
from .caption import Captioner

_OWN_POLICY = ("existing_caption",)


def add_tagger_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tagger captions (used with --tagger-model)")
    add_cli_arguments(group, TagRunOptions, skip=[s.name for s in specs(TagRunOptions)
                                                  if s.name not in MODEL_SOURCE_OPTIONS])
    add_cli_arguments(group, CaptionOptions, skip=_OWN_POLICY)


def caption_options_from_cli(args: argparse.Namespace) -> CaptionOptions:
    own = {k: v for k, v in vars(args).items() if k not in _OWN_POLICY}
    return from_cli(CaptionOptions, argparse.Namespace(**own))


def model_source_from_cli(args: argparse.Namespace) -> TagRunOptions:
    """`alchemy tag`'s run options with just the model-source flags taken from the command line
    (preprocessing has flags of its own, e.g. --recursive, that must not leak into them)."""
    shared = {k: v for k, v in vars(args).items() if k in MODEL_SOURCE_OPTIONS}
    return from_cli(TagRunOptions, argparse.Namespace(**shared))


def tagger_captioner(model: str, caption_options: CaptionOptions | None = None, *,
                     models_dir: str | os.PathLike | None = None, download: bool = False, device: str = "auto",
                     device_id: int = 0, report: Callable[[str], None] | None = None
                     ) -> tuple[Captioner | None, str, Callable[[], None]]:
    """(captioner or None, id of the model + caption settings, function that unloads the model).

    `model` is what `alchemy tag --model` accepts: a folder, a folder name in `models_dir` (default
    models/tagger), or a known model (fetched into `models_dir` first when `download`). Empty: no
    tagger captions.
    """
    if not model:
        return None, "", lambda: None
    check_options(caption_options or CaptionOptions())  # a bad /regex/ fails before the model loads
    folder = resolve_model(model, models_dir, download=download, report=report)
    tagger = load_tagger(folder, device=device, device_id=device_id, report=report)
    return (*captioner_for(tagger, caption_options), tagger.unload)


def captioner_for(tagger, caption_options: CaptionOptions | None = None) -> tuple[Captioner, str]:
    """(captioner, id of the model + caption settings) for an already loaded `tagger` (the UI's shared
    tagger slot: one model resident at a time)."""
    opts = check_options(caption_options or CaptionOptions())

    def captioner(images):
        return caption_images(tagger, images, opts)

    return captioner, f"{tagger.model_id}:{json.dumps(to_dict(opts), sort_keys=True)}"
