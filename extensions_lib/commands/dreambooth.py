"""``alchemy dreambooth train``: DreamBooth on a checkpoint (LoRA or full fine-tune), with prior preservation."""
from __future__ import annotations

import argparse
from ..options import from_cli
from .hypernetwork import TrainCommand  # the same --ckpt and --device
from .method_commands import add_action, report_result, require_checkpoint, step_bar, training_plan


def register(subparsers) -> None:
    from ..dreambooth.options import DreamBoothTrainOptions

    parser = subparsers.add_parser("dreambooth", help="DreamBooth: LoRA or full fine-tune with prior preservation",
                                   description="Fine-tune a checkpoint on a subject (DreamBooth).")
    actions = parser.add_subparsers(dest="dreambooth_action", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    add_action(actions, "train", run_train, (TrainCommand, DreamBoothTrainOptions),
               help="train a LoRA or a whole checkpoint on instance images",
               description="Train on --data-root images captioned --instance-prompt; with --class-prompt and "
                           "--class-dir, class images (generated when fewer than --num-class-images exist) keep "
                           "the class as it was (loss = instance + λ·prior). LoRA mode writes "
                           "<lora dir>/<name>.safetensors for <lora:name:w>; full mode writes "
                           "<checkpoints dir>/<name>.safetensors. Ctrl-C stops at the next step and saves; "
                           "--resume LOG_DIR continues exactly. Data-parallel: torchrun --nproc-per-node N -m "
                           "extensions_lib dreambooth train ... (--batch-size per process; rank 0 writes).")


def run_train(args: argparse.Namespace) -> int:
    from ..backend.standalone import load_model
    from ..dreambooth.concepts import concepts_from_options
    from ..dreambooth.method import train_dreambooth
    from ..dreambooth.options import DreamBoothTrainOptions

    from ..dreambooth.distributed import from_environment, local_device

    command = from_cli(TrainCommand, args)
    plan = training_plan(DreamBoothTrainOptions, args)
    concepts_from_options(plan.options)  # bad concepts are reported before the slow model load
    ckpt = require_checkpoint(command.ckpt)
    shard = from_environment(plan.options.distributed_timeout)  # started by torchrun with several processes
    adapter = load_model(ckpt, device=local_device() if shard is not None else command.device)
    if shard is not None and shard.rank != 0:
        result = train_dreambooth(adapter, plan, shard=shard, model_reused=False)
        return 130 if result.interrupted else 0
    with step_bar(plan.options.steps, f"training {plan.options.model_name}") as progress:
        result = train_dreambooth(adapter, plan, callbacks=progress, shard=shard, model_reused=False)
    return report_result(result, "dreambooth train", ckpt)
