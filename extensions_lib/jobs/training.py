"""The create/train jobs behind the training sub-tabs (and the WebUI API: same processing).

The work is the methods' own public functions (``embeddings.create.create_embedding``,
``embeddings.method.train_embedding``, ``hypernetworks.method.train_hypernetwork``); this module only
points their options at the host's folders and turns the trainer's progress into the job's. Each method's
registration (:mod:`extensions_lib.methods.registry`) names its jobs here: ``train_job(TrainRequest,
JobContext)`` and ``create_job(CreateRequest, JobContext | None)``.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..errors import AlchemyError
from ..train.loop import TrainResult
from ..train.options import resolve_seed
from .context import UIContext
from .progress import JobContext

PREVIEW_FIELDS = ("preview_prompt", "preview_negative_prompt", "preview_steps", "preview_sampler",
                  "preview_cfg_scale", "preview_seed", "preview_width", "preview_height")
"""The training options the WebUI's txt2img preview parameters fill, in the order the host passes them
([prompt, negative_prompt, steps, sampler_name, cfg_scale, seed, width, height])."""


def with_txt2img_preview(options, values: Sequence[Any]):
    """`options` with its preview settings taken from the WebUI's txt2img values; returns (options, note).

    Options that have "read parameters from txt2img" are left alone while it is off. A txt2img sampler we
    do not have keeps the options' own sampler, and the note says so.
    """
    from ..options import from_dict, to_dict
    from ..sampling.samplers import SAMPLERS, find_sampler

    if getattr(options, "preview_from_txt2img", True) is False or not values:
        return options, ""
    update = {k: v for k, v in zip(PREVIEW_FIELDS, values) if hasattr(options, k)}
    note = ""
    if "preview_sampler" in update:
        try:
            spec = find_sampler(str(update["preview_sampler"]))
            update["preview_sampler"] = next(key for key, s in SAMPLERS.items() if s is spec)
        except AlchemyError:
            note = (f"previews use {options.preview_sampler}: txt2img's sampler {update['preview_sampler']!r} "
                    "is not available here")
            update["preview_sampler"] = options.preview_sampler
    return from_dict(type(options), {**to_dict(options), **update}, source="txt2img preview parameters"), note


def for_context(options, context: UIContext):
    """The options with the host's folder filled in (the one the tab does not show: the registered method's
    ``folder_option``), the log directory resolved and a fixed seed."""
    from ..methods.registry import for_options

    changes: dict[str, Any] = {"log_directory": str(context.resolve_log_directory(options.log_directory))}
    method = for_options(type(options))
    if method is not None and method.folder_option is not None:
        changes[method.folder_option] = str(context.folder(method.folder))
    return resolve_seed(dataclasses.replace(options, **changes))


def describe_training(result: TrainResult, noun: str, name: str) -> str:
    """What the tab says when a run ends: where the trained file and the logs are, or how to go on."""
    if result.cancelled:
        text = (f"Stopped {noun} {name} at step {result.step}; a copy is in {result.log_dir}."
                + (f" Resume from {result.resume_path}." if result.resume_path else ""))
    else:
        text = f"Trained {noun} {name} for {result.step} steps: {result.final_path} (log: {result.log_dir})"
    if result.skipped_nonfinite:
        text += f" {result.skipped_nonfinite} step(s) with a NaN/inf loss were skipped."
    return "\n".join([text, *result.warnings])


# ---- embeddings ----------------------------------------------------------------------------------------

@dataclass
class CreateRequest:
    options: Any
    """The method's ``create_options``."""
    context: UIContext


def create_embedding_file(request: CreateRequest, job: JobContext) -> Path:
    """Write a new embedding into the embeddings folder (needs the model: its token vectors seed it)."""
    from ..embeddings.create import create_embedding

    o, context = request.options, request.context
    job.update(message="reading the initialization text's token vectors")
    path = create_embedding(context.model(), o.name, o.init_text, o.num_vectors_per_token, o.overwrite,
                            directory=context.embeddings_dir)
    context.files_changed("embeddings")
    job.update(message=f"Created: {path}")
    return path


@dataclass
class TrainRequest:
    options: Any
    context: UIContext


def train_embedding_file(request: TrainRequest, job: JobContext) -> TrainResult:
    from ..embeddings.method import train_embedding

    options = for_context(request.options, request.context)
    adapter = request.context.model()
    job.update(message="encoding the dataset", unit="image")
    result = train_embedding(adapter, options, callbacks=[job.train_callback], cancel=job.cancel,
                             on_progress=job.counter("image"))
    request.context.files_changed("embeddings")
    job.update(message=describe_training(result, "embedding", options.embedding_name))
    return result


# ---- hypernetworks --------------------------------------------------------------------------------------

def create_hypernetwork_file(request: CreateRequest, job: JobContext | None = None) -> Path:
    """Write a new, untrained hypernetwork into the hypernetworks folder (instant: no model, no job needed)."""
    from ..hypernetworks.create import create_hypernetwork

    path = create_hypernetwork(request.options, request.context.hypernetworks_dir)
    request.context.files_changed("hypernetworks")
    return path


def train_hypernetwork_file(request: TrainRequest, job: JobContext) -> TrainResult:
    from ..hypernetworks.method import train_hypernetwork

    options = for_context(request.options, request.context)
    adapter = request.context.model()
    job.update(message="encoding the dataset")
    result = train_hypernetwork(adapter, options, callbacks=[job.train_callback], cancel=job.cancel,
                                say=lambda line: job.update(message=line))
    request.context.files_changed("hypernetworks")
    job.update(message=describe_training(result, "hypernetwork", options.hypernetwork_name))
    return result
