"""Captioning preprocessed images with the tagger package, through its public API only.

The tagger's caption options (thresholds, filters, layout...) are declared once in
`extensions_lib.tagger.options.CaptionOptions` and reused here as flags; only its existing-caption
policy is left out, because preprocessing has its own (the WebUI's ignore/copy/prepend/append).
"""
from __future__ import annotations

import argparse
import json
from typing import Callable

from ..options import add_cli_arguments, from_cli, to_dict
from ..tagger import CaptionOptions, caption_images, load_tagger, resolve_model
from ..tagger.captions import check_options
from .caption import Captioner

_OWN_POLICY = ("existing_caption",)


def add_tagger_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("tagger captions (used with --tagger-model)")
    add_cli_arguments(group, CaptionOptions, skip=_OWN_POLICY)


def caption_options_from_cli(args: argparse.Namespace) -> CaptionOptions:
    own = {k: v for k, v in vars(args).items() if k not in _OWN_POLICY}
    return from_cli(CaptionOptions, argparse.Namespace(**own))


def tagger_captioner(model: str, caption_options: CaptionOptions | None = None, *, device: str = "auto",
                     report: Callable[[str], None] | None = None
                     ) -> tuple[Captioner | None, str, Callable[[], None]]:
    """(captioner or None, id of the model + caption settings, function that unloads the model).

    `model` is what `alchemy tag --model` accepts: a folder, a folder name in models/tagger, or a known
    model already downloaded there. Empty: no tagger captions.
    """
    if not model:
        return None, "", lambda: None
    opts = check_options(caption_options or CaptionOptions())  # a bad /regex/ fails before the model loads
    tagger = load_tagger(resolve_model(model), device=device, report=report)

    def captioner(images):
        return caption_images(tagger, images, opts)

    caption_id = f"{tagger.model_id}:{json.dumps(to_dict(opts), sort_keys=True)}"
    return captioner, caption_id, tagger.unload
