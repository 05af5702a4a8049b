"""The APT create/train jobs behind its sub-tabs and API routes (see :mod:`extensions_lib.jobs.training`)."""
from __future__ import annotations

from pathlib import Path

from ..jobs.progress import JobContext
from ..jobs.training import CreateRequest, TrainRequest, describe_training, for_context
from ..train.loop import TrainResult


def create_apt_files(request: CreateRequest, job: JobContext) -> Path:
    """Write ``{name}`` and ``{name}-neg`` into the embeddings folder; returns the positive's path."""
    from .create import create_pair

    context = request.context
    job.update(message="reading the initialization texts' token vectors")
    pos, neg = create_pair(context.model(), request.options, directory=context.embeddings_dir)
    context.files_changed("embeddings")
    job.update(message=f"Created: {pos} and {neg}")
    return pos


def train_apt_file(request: TrainRequest, job: JobContext) -> TrainResult:
    from .session import train_apt

    options = for_context(request.options, request.context)
    job.update(message="encoding the dataset", unit="image")
    result = train_apt(request.context.model(), options, callbacks=[job.train_callback], cancel=job.cancel,
                       on_progress=job.counter("image"))
    request.context.files_changed("embeddings")
    job.update(message=describe_training(result, "APT pair", options.embedding_name))
    return result
