"""Every tagger option, declared once (CLI flags, gradio components and saved JSON come from here)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..options import option

# SmilingWolf's list (also the old tagger extension's): these keep their underscores, since "^ ^" is
# no longer the same face.
KAOMOJI = ["0_0", "(o)_(o)", "+_+", "+_-", "._.", "<o>_<o>", "<|>_<|>", "=_=", ">_<", "3_3", "6_9",
           ">_o", "@_@", "^_^", "o_o", "u_u", "x_x", "|_|", "||_||"]

EXISTING_POLICIES = ("skip", "overwrite", "append", "prepend")

# Default thresholds per model family, used when a threshold option is left empty.
WD14_THRESHOLDS = (0.35, 0.85)
DEEPDANBOORU_THRESHOLDS = (0.5, 0.5)


@dataclass
class CaptionOptions:
    """How probabilities become caption text, and how it meets a caption already on disk."""

    general_threshold: Optional[float] = option(
        None, help="keep general tags scoring at least this; empty = the model's default "
                   "(WD14 0.35, DeepDanbooru 0.5)", minimum=0.0, maximum=1.0, widget="number", group="Thresholds")
    general_mcut: bool = option(False, label="General MCut",
                                help="pick the general threshold per image at the largest gap between "
                                     "sorted scores (MCut) instead", group="Thresholds")
    character_threshold: Optional[float] = option(
        None, help="keep character tags scoring at least this; empty = the model's default "
                   "(WD14 0.85)", minimum=0.0, maximum=1.0, widget="number", group="Thresholds")
    character_mcut: bool = option(False, label="Character MCut",
                                  help="pick the character threshold per image by MCut (never below 0.15)",
                                  group="Thresholds")
    rating: str = option("off", help="write the most likely rating tag", choices=["off", "first", "last"],
                         group="Layout")
    characters: str = option("first", help="where character tags go", choices=["first", "last"], group="Layout")
    sort: str = option("confidence", help="order of the model's tags", choices=["confidence", "alphabetical"],
                       group="Layout")
    max_tags: int = option(0, help="keep at most this many model tags (highest scores); 0 = no limit",
                           minimum=0, group="Layout")
    trigger_tags: list = option([], help="tags always written first (e.g. a trigger word); comma-separated",
                                multiple=True, widget="textbox", group="Layout")
    separator: str = option(", ", help="text between tags", group="Layout")
    underscores_to_spaces: bool = option(True, help="write 'long hair' instead of 'long_hair'", group="Text")
    underscore_exceptions: list = option(list(KAOMOJI), help="tags that keep their underscores (kaomoji)",
                                         multiple=True, widget="textbox", group="Text")
    escape_brackets: bool = option(False, help="escape \\ ( ) with a backslash, as prompts need; training "
                                               "captions usually want them plain", group="Text")
    exclude: list = option([], help="tags never written; case, '_' and spaces ignored; /regex/ allowed",
                           multiple=True, widget="textbox", group="Filters")
    include: list = option([], help="if given, only these tags are written (same matching as exclude)",
                           multiple=True, widget="textbox", group="Filters")
    existing_caption: str = option("skip", help="when a caption file already exists: skip the image (no "
                                                "inference, so a re-run resumes), overwrite it, append the new "
                                                "tags after it or prepend them before it (duplicates dropped; tags "
                                                "an earlier run wrote are replaced, your own kept: the score cache "
                                                "folder remembers which are which)",
                                   choices=list(EXISTING_POLICIES), group="Existing captions")


# The options saying where a tagger model comes from and where it runs. `alchemy preprocess` offers
# these same declarations beside its --tagger-model (see extensions_lib/preprocess/tagging.py).
MODEL_SOURCE_OPTIONS = ("models_dir", "download", "device", "device_id")


@dataclass
class TagRunOptions:
    """Which model tags which folder, and where the results go."""

    model: str = option("", help="tagger model: a folder (model.onnx + selected_tags.csv, or a DeepDanbooru "
                                 ".pt/.safetensors), a folder name inside --models-dir, or a known model name",
                        ui=False)
    models_dir: Optional[Path] = option(None, help="folder holding one sub-folder per tagger model "
                                                   "[default: models/tagger]", ui=False)
    download: bool = option(False, help="download a known model from the Hugging Face Hub (pinned revision) "
                                        "into --models-dir if it is missing")
    recursive: bool = option(False, help="also tag images in sub-folders")
    output_dir: Optional[Path] = option(None, help="write captions here, mirroring the input folders, "
                                                   "instead of beside each image", ui=False)
    caption_extension: str = option(".txt", help="caption file extension")
    batch_size: int = option(0, help="images per model call; 0 = automatic (1 on CPU, 16 on GPU; fixed-batch "
                                     "models always get their own)", minimum=0)
    workers: int = option(0, help="image decoding threads; 0 = automatic", minimum=0)
    cache: bool = option(True, help="cache raw scores per (image content, model) so changed thresholds or "
                                    "filters re-caption without running the model")
    cache_dir: Optional[Path] = option(None, help="where the score cache lives [default: "
                                                  "~/.cache/alchemy/tagger]", ui=False)
    manifest: Optional[Path] = option(None, help="also write a JSONL file with each image's tags and scores",
                                      ui=False)
    max_pixels: int = option(89_478_485, help="skip images with more pixels than this (decompression-bomb "
                                              "guard)", minimum=1)
    device: str = option("auto", help="where the model runs", choices=["auto", "cpu", "cuda"])
    device_id: int = option(0, help="CUDA device index", minimum=0)
    summary_top: int = option(20, help="how many of the most frequent tags the summary lists", minimum=0)
