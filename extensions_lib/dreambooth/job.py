"""The DreamBooth training job for the Train sub-tab and the API (``function(TrainRequest, JobContext)``)."""
from __future__ import annotations

import dataclasses

from ..jobs.training import TrainRequest, describe_training, for_context
from ..train.loop import TrainResult


def train_dreambooth_file(request: TrainRequest, job) -> TrainResult:
    from .method import train_dreambooth

    options = for_context(request.options, request.context)
    if options.mode == "full" and "checkpoints" in request.context.folders:  # the host's checkpoint folder
        options = dataclasses.replace(options, checkpoints_dir=str(request.context.folder("checkpoints")))
    adapter = request.context.model()
    job.update(message="generating missing class images, then encoding the images")
    result = train_dreambooth(adapter, options, callbacks=[job.train_callback], cancel=job.cancel,
                              say=lambda line: job.update(message=line))
    request.context.files_changed("lora" if options.mode == "lora" else "checkpoints")
    job.update(message=describe_training(result, "DreamBooth model", options.model_name))
    return result
