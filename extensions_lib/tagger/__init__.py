"""Booru-style dataset tagging: WD14 (onnxruntime) and DeepDanbooru (torch) taggers, caption rules,
a score cache and the directory pipeline behind `alchemy tag`.

Entry points for other code:
- :func:`load_tagger(folder)` -> a :class:`Tagger` (`prepare(image)`, `predict(batch)`, `labels`);
  :class:`ModelSlot` keeps one resident; :func:`resolve_model` finds or downloads a folder;
- :func:`caption_images(tagger, images, CaptionOptions())` -> caption texts for in-memory images;
- :func:`render_caption(probs, labels, options)` (pure) and :class:`CaptionOptions`;
- :func:`tag_directory(folder, tagger, caption_options, run_options)` -> :class:`RunSummary`;
- :func:`decode_image(path_or_bytes)` -> RGB/RGBA image or :class:`ImageSkipped` with a reason.
"""
from .base import Tagger, predict_images
from .captions import caption_tags, render_caption
from .image_io import ImageSkipped, decode_image, list_images
from .labels import Labels
from .models import ModelSlot, list_models, load_tagger, resolve_model
from .options import CaptionOptions, TagRunOptions
from .run import RunSummary, caption_images, format_summary, tag_directory

__all__ = [
    "Tagger", "predict_images", "caption_tags", "render_caption", "ImageSkipped", "decode_image", "list_images",
    "Labels", "ModelSlot", "list_models", "load_tagger", "resolve_model", "CaptionOptions", "TagRunOptions",
    "RunSummary", "caption_images", "format_summary", "tag_directory",
]
