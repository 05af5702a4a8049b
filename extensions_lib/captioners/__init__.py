"""Captions beyond booru tags: BLIP sentences, CLIP-interrogator prompts and a caption composer.

Entry points:
- :func:`load_blip(folder)` -> :class:`BlipCaptioner` (`caption(images, BlipOptions)`, `unload()`);
- :func:`load_clip(path, name=...)` -> :class:`ClipInterrogator` (`image_features`, `tables`), and
  :class:`Prompter` (classic / fast / best / negative prompts from one image's features);
- :func:`compose` (pure): trigger words + tags + sentence + CLIP terms under a CLIP-token budget;
- :func:`caption_directory`: the folder pipeline behind `alchemy caption` / `alchemy interrogate`, one
  model resident at a time in a :class:`extensions_lib.tagger.ModelSlot`, results cached per image
  content;
- :mod:`.models`: finding and downloading the weights; :mod:`.labels`: the label tables and their
  clip-interrogator-compatible embedding cache files.
"""
from .blip import BlipCaptioner, load_blip
from .clip_interrogator import ClipInterrogator, Prompter, load_clip, token_count, top_k, truncate_to_fit
from .compose import Composed, Parts, compose
from .options import BlipOptions, CaptionRunOptions, ComposeOptions, InterrogateOptions
from .run import CaptionSummary, Models, caption_directory, caption_image

__all__ = ["BlipCaptioner", "load_blip", "ClipInterrogator", "Prompter", "load_clip", "token_count", "top_k",
           "truncate_to_fit", "Composed", "Parts", "compose", "BlipOptions", "CaptionRunOptions", "ComposeOptions",
           "InterrogateOptions", "CaptionSummary", "Models", "caption_directory", "caption_image"]
