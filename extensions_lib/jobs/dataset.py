"""The tagger and preprocessing jobs behind the dataset tabs (and the WebUI API: same processing).

Each job is ``fn(request, job)`` for a :class:`~extensions_lib.jobs.progress.JobRunner`; the request
dataclass holds the options instances and folders, the processing itself is the tagger's and the
preprocessor's public functions.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import AlchemyError
from ..preprocess.options import PreprocessOptions
from ..tagger.options import CaptionOptions, TagRunOptions
from .context import UIContext
from .progress import JobContext


def _folder(value: str | Path | None, what: str, fix: str) -> Path:
    text = str(value or "").strip()
    if not text:
        raise AlchemyError(f"no {what} given", fix=fix)
    path = Path(text).expanduser()
    if not path.is_dir():
        raise AlchemyError(f"{what} not found", path, fix)
    return path


def resolve_tagger(context: UIContext, model: str, *, download: bool = False, job: JobContext | None = None) -> Path:
    """The folder of tagger `model` (a folder name in the tagger models folder, a path, or with `download`
    a known model fetched into that folder)."""
    from ..tagger.models import resolve_model

    if not str(model or "").strip():
        raise AlchemyError("no tagger model chosen", context.tagger_models_dir,
                           "put a model folder (model.onnx + selected_tags.csv, or a DeepDanbooru .pt) here, "
                           "press refresh and pick it")
    report = (lambda line: job.update(message=line)) if job is not None else None
    return resolve_model(str(model).strip(), context.tagger_models_dir, download=download, report=report)


@dataclass
class TagRequest:
    folder: str
    model: str
    run: TagRunOptions
    caption: CaptionOptions
    context: UIContext


def tag_folder(request: TagRequest, job: JobContext):
    """Caption every image of the folder; returns the tagger's :class:`RunSummary`."""
    from ..tagger.run import format_summary, tag_directory

    folder = _folder(request.folder, "image folder", "type the path of the folder holding the images")
    model_dir = resolve_tagger(request.context, request.model, download=request.run.download, job=job)
    job.update(message=f"loading {model_dir.name}", unit="image")
    run = dataclasses.replace(request.run, models_dir=request.context.tagger_models_dir)
    if run.cache_dir is None and request.context.cache_dir is not None:
        run = dataclasses.replace(run, cache_dir=request.context.cache_dir / "tagger")
    tagger = request.context.tagger().get(model_dir, device=run.device, device_id=run.device_id)
    summary = tag_directory(folder, tagger, request.caption, run, progress=job.counter("image"),
                            should_stop=job.should_stop)
    job.update(message=format_summary(summary, run.summary_top))
    return summary


@dataclass
class TagImageRequest:
    image: Any
    model: str
    run: TagRunOptions
    caption: CaptionOptions
    context: UIContext


def tag_image(request: TagImageRequest, job: JobContext) -> str:
    """The caption one in-memory image gets (nothing is written)."""
    from ..tagger.run import caption_images

    if request.image is None:
        raise AlchemyError("no image given", fix="drop an image into the image box first")
    model_dir = resolve_tagger(request.context, request.model, download=request.run.download, job=job)
    tagger = request.context.tagger().get(model_dir, device=request.run.device, device_id=request.run.device_id)
    job.update(step=0, total=1, unit="image")
    image = request.image if request.image.mode in ("RGB", "RGBA") else request.image.convert("RGB")
    caption = caption_images(tagger, [image], request.caption)[0]
    job.update(step=1, total=1, message=caption)
    return caption


@dataclass
class PreprocessRequest:
    source: str
    destination: str
    options: PreprocessOptions
    caption: CaptionOptions
    context: UIContext


def preprocess_folder(request: PreprocessRequest, job: JobContext):
    """Turn the source folder into a training folder; returns the :class:`PreprocessSummary`."""
    from ..preprocess.focal import opencv_face_detector
    from ..preprocess.run import preprocess_directory
    from ..preprocess.tagging import captioner_for
    from ..tagger.captions import check_options

    source = _folder(request.source, "source folder", "type the path of the folder holding the source images")
    if not str(request.destination or "").strip():
        raise AlchemyError("no destination folder given", fix="type where the processed images should go")
    options = request.options
    captioner, caption_id = None, ""
    if options.tagger_model:
        check_options(request.caption)  # a bad /regex/ fails before the model loads
        folder = resolve_tagger(request.context, options.tagger_model, job=job)
        options = dataclasses.replace(options, tagger_model=str(folder))
        # The tag tab's slot: loading here replaces its model instead of holding a second one.
        captioner, caption_id = captioner_for(request.context.tagger().get(folder), request.caption)
    faces = opencv_face_detector() if options.focal_crop and options.focal_face_weight > 0 else None
    summary = preprocess_directory(source, Path(request.destination).expanduser(), options, captioner=captioner,
                                   caption_id=caption_id, face_detector=faces, progress=job.counter("image"),
                                   should_stop=job.should_stop)
    job.update(message="\n".join(summary.lines()))
    return summary
