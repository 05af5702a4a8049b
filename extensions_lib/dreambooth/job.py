"""The DreamBooth training job for the Train sub-tab and the API (``function(TrainRequest, JobContext)``)."""
from __future__ import annotations

from ..jobs.training import TrainRequest, describe_training, for_context
from ..train.loop import TrainResult


def train_dreambooth_file(request: TrainRequest, job) -> TrainResult:
    from .method import train_dreambooth

    options = for_context(request.options, request.context)
    adapter = request.context.model()
    job.update(message="generating missing class images, then encoding the images")
    result = train_dreambooth(adapter, options, callbacks=[job.train_callback], cancel=job.cancel,
                              say=lambda line: job.update(message=line))
    if options.mode == "lora":
        request.context.files_changed("lora")
    job.update(message=describe_training(result, "DreamBooth model", options.model_name))
    return result
