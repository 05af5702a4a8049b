"""The captioning jobs behind the Captions tab and the API's /caption routes (same processing as
`alchemy caption`). Models come from ``<tagger models folder>/../captioners`` (``models/captioners`` in
the WebUI) and share the tagger's slot: one model resident at a time across the dataset tabs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..captioners.options import BlipOptions, CaptionRunOptions, ComposeOptions, InterrogateOptions
from ..errors import AlchemyError
from ..tagger.options import CaptionOptions
from .context import UIContext
from .progress import JobContext


def captioner_models_dir(context: UIContext) -> Path:
    return context.tagger_models_dir.parent / "captioners"


def _run_options(context: UIContext, run: CaptionRunOptions) -> CaptionRunOptions:
    run = dataclasses.replace(run, models_dir=run.models_dir or captioner_models_dir(context))
    if run.cache_dir is None and context.cache_dir is not None:
        run = dataclasses.replace(run, cache_dir=context.cache_dir)
    return run


@dataclass
class CaptionRequest:
    """A folder to caption (`folder`), or one in-memory image (`image`) for :func:`caption_image`."""

    run: CaptionRunOptions
    compose: ComposeOptions
    context: UIContext
    folder: str = ""
    image: Any = None
    blip: BlipOptions = field(default_factory=BlipOptions)
    clip: InterrogateOptions = field(default_factory=InterrogateOptions)
    tags: CaptionOptions = field(default_factory=CaptionOptions)


def caption_folder(request: CaptionRequest, job: JobContext):
    """Caption every image of the folder; returns the :class:`CaptionSummary`."""
    from ..captioners.run import caption_directory
    from ..commands.captions import resolve_models

    folder = Path(str(request.folder or "").strip()).expanduser()
    if not str(request.folder or "").strip() or not folder.is_dir():
        raise AlchemyError("image folder not found", folder, "type the path of the folder holding the images")
    run = _run_options(request.context, request.run)
    models = resolve_models(run, report=lambda line: job.update(message=line))
    summary = caption_directory(folder, models, run, request.compose, slot=request.context.tagger(),
                                blip_opts=request.blip, clip_opts=request.clip, tag_opts=request.tags,
                                progress=job.counter("step"), should_stop=job.should_stop,
                                report=lambda text: job.update(message=text))
    job.update(message="\n".join(summary.lines()))
    return summary


def caption_image(request: CaptionRequest, job: JobContext) -> str:
    """The caption one in-memory image gets (written nowhere; the caches are used and filled)."""
    from ..captioners.run import caption_image as caption_one
    from ..commands.captions import resolve_models

    if request.image is None:
        raise AlchemyError("no image given", fix="drop an image into the image box first")
    run = _run_options(request.context, request.run)
    models = resolve_models(run, report=lambda line: job.update(message=line))
    text = caption_one(request.image, models, run, request.compose, slot=request.context.tagger(),
                       blip_opts=request.blip, clip_opts=request.clip, tag_opts=request.tags,
                       progress=job.counter("step"), should_stop=job.should_stop)
    job.update(message=text)
    return text
