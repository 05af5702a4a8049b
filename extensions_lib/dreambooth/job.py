"""The DreamBooth training job for the Train sub-tab and the API (``function(TrainRequest, JobContext)``)."""
from __future__ import annotations

import contextlib
import dataclasses

from ..errors import AlchemyError
from ..jobs.training import TrainRequest, describe_training, for_context
from ..train.loop import TrainResult


def train_dreambooth_file(request: TrainRequest, job) -> TrainResult:
    from .method import train_dreambooth

    options = for_context(request.options, request.context)
    if options.mode == "full" and "checkpoints" in request.context.folders:  # the host's checkpoint folder
        options = dataclasses.replace(options, checkpoints_dir=str(request.context.folder("checkpoints")))
    adapter = request.context.model()
    if options.mode == "full" and adapter.moves_parts:
        # The host would move the UNet out between our calls (and its optimizer state with it): a full
        # fine-tune needs it resident, with gradients and optimizer state, far beyond what --medvram is for.
        raise AlchemyError("a full DreamBooth fine-tune cannot run while the WebUI moves model parts in and out "
                           "of GPU memory (--medvram)",
                           fix="choose mode 'lora' (little memory), or restart the WebUI without --medvram")
    job.update(message="generating missing class images, then encoding the images")
    # A host that merges networks (<lora:...>) into the weights gives them back unmerged for the whole run:
    # class images, training and the saved checkpoint start from the checkpoint's own weights.
    own_weights = getattr(adapter, "own_weights", None)
    with own_weights() if callable(own_weights) else contextlib.nullcontext():
        result = train_dreambooth(adapter, options, callbacks=[job.train_callback], cancel=job.cancel,
                                  say=lambda line: job.update(message=line))
    request.context.files_changed("lora" if options.mode == "lora" else "checkpoints")
    job.update(message=describe_training(result, "DreamBooth model", options.model_name))
    return result
