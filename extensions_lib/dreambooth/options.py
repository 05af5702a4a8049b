"""DreamBooth training options, declared once (CLI flags, the Train sub-tab and the saved settings).

One concept is given with the ``instance_*``/``class_*`` options; more with ``concepts_file``, a JSON list
of objects with the same keys (see :mod:`.concepts`).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..options import option
from ..sampling.samplers import SAMPLERS
from ..train.options import TrainingOptions

_DB, _CLASS, _LORA, _OUT = "DreamBooth", "Class images (prior preservation)", "LoRA", "Output"

DEFAULT_CHECKPOINTS_DIR = "models/Stable-diffusion"
DEFAULT_LORA_DIR = "models/Lora"


@dataclass
class DreamBoothTrainOptions(TrainingOptions):
    model_name: str = option("", label="Output name", group=_DB,
                             help="name of the file written: <checkpoints dir>/<name>.safetensors (full) or "
                                  "<lora dir>/<name>.safetensors (LoRA)")
    mode: str = option("lora", choices=["lora", "full"], group=_DB, widget="radio",
                       help="'lora': train a LoRA (little memory; a kohya-format file for <lora:name:w>); "
                            "'full': fine-tune the UNet weights and write a whole checkpoint")
    train_text_encoder: bool = option(False, group=_DB,
                                      help="also train the text encoder (LoRA on its attention/MLP, or its weights)")
    # The instance images are data_root (the shared dataset option).
    instance_prompt: str = option("", group=_DB,
                                  help="prompt of the instance images, with a rare token: 'a photo of sks dog' "
                                       "([filewords] is replaced by each image's caption)")
    concepts_file: str = option("", group=_DB,
                                help="JSON list of concepts for several in one run: objects with instance_dir, "
                                     "instance_prompt, class_prompt, class_dir, num_class_images (replaces the "
                                     "single-concept options)")
    # --- prior preservation ------------------------------------------------------------------------
    class_prompt: str = option("", group=_CLASS,
                               help="prompt of the class: 'a photo of dog' (empty = no prior preservation)")
    class_dir: str = option("", group=_CLASS, help="folder of class images; missing ones are generated into it")
    num_class_images: int = option(100, minimum=0, group=_CLASS,
                                   help="class images wanted; fewer on disk are generated with the loaded model")
    prior_loss_weight: float = option(1.0, minimum=0.0, group=_CLASS,
                                      help="weight λ of the class-image loss: loss = instance + λ·prior")
    class_sampler: str = option("euler", choices=list(SAMPLERS), group=_CLASS, help="sampler for class images")
    class_steps: int = option(30, minimum=1, maximum=150, group=_CLASS, help="sampling steps for class images")
    class_cfg_scale: float = option(7.0, minimum=1.0, maximum=30.0, step=0.5, group=_CLASS,
                                    help="CFG scale for class images")
    class_negative_prompt: str = option("", group=_CLASS, help="negative prompt for class images")
    gradient_checkpointing: bool = option(False, group=_DB,
                                          help="recompute the UNet's block activations in the backward pass instead "
                                               "of keeping them (less memory, about 30% slower)")
    use_8bit_adam: bool = option(True, label="8-bit AdamW when available", group=_DB,
                                 help="on a GPU with bitsandbytes installed, keep the optimizer state in 8 bits "
                                      "(otherwise torch's AdamW is used)")
    fused_backward_step: bool = option(False, label="Fused backward+step", group=_DB,
                                       help="update each weight as soon as its gradient is computed and free the "
                                            "gradient, so no gradient buffer of the whole model exists (torch >= "
                                            "2.1; not with gradient accumulation, clipping or fp16 loss scaling)")
    offload_unused: bool = option(True, label="Move VAE and text encoder out of memory when not trained",
                                  group=_DB,
                                  help="with latents and prompt encodings cached, keep the VAE (and the text "
                                       "encoder when it is not trained) off the compute device during the steps; "
                                       "they come back for saving")
    distributed_timeout: int = option(1800, minimum=10, group=_DB, ui=False, label="Distributed timeout (s)",
                                      help="under torchrun: how long a process waits for the others in one "
                                           "exchange before it fails (a process that died or hangs)")
    ema_decay: float = option(0.0, minimum=0.0, maximum=0.99999, group=_DB, label="EMA decay",
                              help="keep an exponential moving average of the trained weights and write that "
                                   "(0 = off; 0.999 is usual; costs one more copy of the trained weights)")
    # --- LoRA ---------------------------------------------------------------------------------------
    lora_rank: int = option(4, minimum=1, maximum=256, group=_LORA, help="LoRA rank (dimension)")
    lora_alpha: float = option(4.0, minimum=0.0, group=_LORA,
                               help="LoRA alpha: the update is scaled by alpha/rank (alpha = rank: no scaling)")
    lora_dropout: float = option(0.0, minimum=0.0, maximum=1.0, step=0.05, group=_LORA,
                                 help="dropout on the LoRA branch's input while training")
    # --- output -------------------------------------------------------------------------------------
    checkpoints_dir: str = option(DEFAULT_CHECKPOINTS_DIR, group=_OUT, ui=False,
                                  help="folder full fine-tunes are written to (the WebUI's --ckpt-dir)")
    lora_dir: str = option(DEFAULT_LORA_DIR, group=_OUT, ui=False,
                           help="folder LoRA files are written to (the WebUI's --lora-dir)")
    save_fp16: bool = option(False, group=_OUT, help="write float16 weights (half the size)")
    keep_trained_weights: bool = option(False, group=_OUT,
                                        help="full mode: leave the trained weights in the loaded model afterwards "
                                             "(default: the original weights are restored)")
    # Shared options with DreamBooth defaults.
    learn_rate: str = option("1e-4", label="Learning rate", group="Optimisation",
                             help="a rate or schedule; 1e-4 suits LoRA, use about 2e-6 for full fine-tuning")
    template_file: str = option("filewords", group="Dataset", ui=False,
                                help="unused by DreamBooth (prompts come from the concepts)")
    steps: int = option(800, label="Max steps", minimum=1, group="Run", help="stop after this many optimizer steps")
    log_directory: str = option("dreambooth", label="Log directory", group="Saving and logging",
                                help="runs are logged in <log directory>/<YYYY-MM-DD>/<name>/")
