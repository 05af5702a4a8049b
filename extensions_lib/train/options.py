"""Options every training method shares, declared once (see ``extensions_lib.options``).

Field names follow the keys of the WebUI's saved training settings JSON where one exists (learn_rate,
batch_size, gradient_step, data_root, log_directory, template_file, training_width, training_height,
steps, clip_grad_mode, clip_grad_value, latent_sampling_method, create_image_every), so a WebUI settings
file loads with :func:`extensions_lib.options.from_dict`. Methods add their own options by inheriting::

    @dataclass
    class EmbeddingTrainOptions(TrainingOptions):
        embedding_name: str = option("", help="embedding to train")

Methods that render previews also take :class:`PreviewOptions` (the WebUI's ``preview_*`` keys). It is
kept out of :class:`TrainingOptions` because every option there is also a WebUI training-defaults
setting, and preview prompts are per run, not defaults.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from ..options import option
from ..sampling.samplers import SAMPLERS

_DATA, _RUN, _OPT, _SAVE, _PREVIEW = "Dataset", "Run", "Optimisation", "Saving and logging", "Previews"


TEMPLATE_HELP = ("prompt template: a .txt file (one prompt per line, [name] and [filewords] are filled in) or a "
                 "name: the WebUI's own set (style, style_filewords, subject, subject_filewords, hypernetwork, "
                 "none), filewords, or any file in the host's textual_inversion_templates folder")


@dataclass
class TrainingOptions:
    # --- dataset ----------------------------------------------------------------------------------
    data_root: str = option("", help="folder of training images (captions in .txt files beside them, or the file names)",
                            label="Dataset directory", group=_DATA)
    template_file: str = option("subject_filewords", label="Prompt template",
                                help=TEMPLATE_HELP,
                                group=_DATA)
    training_width: int = option(512, help="width images are resized to", label="Width",
                                 minimum=64, maximum=2048, step=8, group=_DATA)
    training_height: int = option(512, help="height images are resized to", label="Height",
                                  minimum=64, maximum=2048, step=8, group=_DATA)
    varsize: bool = option(False, label="Variable size",
                           help="keep each image's own size (rounded to multiples of 64) and batch images by size",
                           group=_DATA)
    shuffle_tags: bool = option(False, help="shuffle the comma-separated tags of each caption every time it is used",
                                group=_DATA)
    tag_drop_out: float = option(0.0, label="Drop out tags",
                                 help="probability of leaving out each caption tag every time it is used",
                                 minimum=0.0, maximum=1.0, step=0.05, group=_DATA)
    latent_sampling_method: str = option("once", choices=["once", "deterministic", "random"], group=_DATA,
                                         help="VAE latents: 'once' samples each image once, 'deterministic' uses the "
                                              "mean, 'random' samples anew each time")
    use_weight: bool = option(False, label="Use PNG alpha channel as loss weight", group=_DATA,
                              help="weight the loss by each PNG's transparency (opaque areas count, clear ones don't)")
    filename_word_regex: str = option("", group=_DATA,
                                      help="for images without a .txt caption: keep only the file-name words this "
                                           "regex finds (empty = whole name)")
    filename_join_string: str = option(" ", group=_DATA, help="joins the words the filename regex found")

    # --- run --------------------------------------------------------------------------------------
    steps: int = option(100000, label="Max steps", help="stop after this many optimizer steps", minimum=1, group=_RUN)
    seed: int = option(-1, help="seed for data order, noise and timesteps (-1 = pick one and record it)", group=_RUN)
    resume: str = option("", group=_RUN, ui=False,
                         help="continue a run exactly where it stopped: its log folder or its resume-state.pt")

    # --- optimisation -----------------------------------------------------------------------------
    learn_rate: str = option("0.005", label="Learning rate", group=_OPT,
                             help="a rate, or a schedule like '0.005:100, 1e-3:1000, 1e-5' (rate until step; "
                                  "training ends when the schedule does)")
    batch_size: int = option(1, help="images per micro-batch", minimum=1, group=_OPT)
    gradient_step: int = option(1, label="Gradient accumulation steps", minimum=1, group=_OPT,
                                help="micro-batches summed into each optimizer step (effective batch = batch size × this)")
    clip_grad_mode: str = option("disabled", choices=["disabled", "value", "norm"], group=_OPT,
                                 help="gradient clipping: by each element's value, by the total norm, or not at all")
    clip_grad_value: str = option("0.1", group=_OPT,
                                  help="clipping threshold; a schedule like the learning rate's is allowed")
    mixed_precision: str = option("auto", choices=["auto", "no", "fp16", "bf16"], group=_OPT,
                                  help="autocast on CUDA ('auto' = bf16 where supported, else fp16 with loss "
                                       "scaling); the CPU always trains in float32")
    min_snr_gamma: float = option(0.0, label="Min-SNR gamma", minimum=0.0, group=_OPT,
                                  help="weight the loss by min(SNR, gamma)/SNR (0 = off; 5 is usual)")
    noise_offset: float = option(0.0, minimum=0.0, maximum=1.0, step=0.01, group=_OPT,
                                 help="offset noise strength (0 = off; 0.1 is common)")
    max_nonfinite_steps: int = option(10, minimum=1, group=_OPT, ui=False,
                                      help="stop with an error after this many optimizer steps in a row whose loss "
                                           "or gradient is NaN/inf (each one is skipped)")

    # --- saving and logging ----------------------------------------------------------------------
    log_directory: str = option("textual_inversion", label="Log directory", group=_SAVE,
                                help="runs are logged in <log directory>/<YYYY-MM-DD>/<name>/")
    save_every: int = option(500, minimum=0, group=_SAVE,
                             help="save a copy of the trained file (and the resume state) every N steps (0 = only at the end)")
    create_image_every: int = option(500, label="Save a preview image every N steps", minimum=0, group=_SAVE,
                                     help="render a preview every N steps (0 = never)")
    save_optimizer_state: bool = option(False, group=_SAVE,
                                        help="also store the optimizer state with each saved file (the WebUI's "
                                             ".optim side file), so training can go on from that file")
    save_resume_state: bool = option(True, group=_SAVE,
                                     help="keep <log>/resume-state.pt up to date so --resume continues exactly "
                                          "(holds the optimizer state: about 3x the size of the trained weights)")
    save_training_settings: bool = option(True, group=_SAVE,
                                          help="write the options used to settings-<date>.json in the log folder")
    write_csv_every: int = option(500, label="Write loss CSV every N steps", minimum=0, group=_SAVE,
                                  help="append step, epoch, loss and learning rate to the loss CSV (0 = off)")
    source_note: str = option("", group=_SAVE, widget="textarea",
                              help="where the training images come from / permission to use them; stored in every file written")


@dataclass
class PreviewOptions:
    """The preview settings of the WebUI's Train tab. Mix in *before* the method's own options class,
    ``class XTrainOptions(PreviewOptions, XOptions)``: dataclasses put the fields of later bases first,
    so the previews stay last in the tab, the CLI help and the saved settings."""

    preview_from_txt2img: bool = option(False, group=_PREVIEW,
                                        label="Read parameters (prompt, etc...) from txt2img tab when making previews",
                                        help="use the preview settings below instead of the last training prompt, "
                                             "20 steps and the training size")
    preview_prompt: str = option("", group=_PREVIEW, widget="textarea", help="preview prompt")
    preview_negative_prompt: str = option("", group=_PREVIEW, help="preview negative prompt")
    preview_steps: int = option(20, minimum=1, maximum=150, step=1, group=_PREVIEW, help="preview sampling steps")
    preview_sampler: str = option("euler", choices=list(SAMPLERS), group=_PREVIEW, help="preview sampler")
    preview_cfg_scale: float = option(7.0, minimum=1.0, maximum=30.0, step=0.5, group=_PREVIEW,
                                      help="preview CFG scale")
    preview_seed: int = option(-1, group=_PREVIEW, help="preview seed (-1 = the run's seed, so previews compare)")
    preview_width: int = option(512, minimum=64, maximum=2048, step=8, group=_PREVIEW, help="preview width")
    preview_height: int = option(512, minimum=64, maximum=2048, step=8, group=_PREVIEW, help="preview height")


def resolve_seed(options: TrainingOptions) -> TrainingOptions:
    """The same options with a concrete seed: -1 becomes a random one (recorded in the saved settings)."""
    if options.seed >= 0:
        return options
    return dataclasses.replace(options, seed=random.SystemRandom().randrange(2**31))
