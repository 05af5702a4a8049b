"""Hypernetwork training options: the shared training options plus what the WebUI's Train tab adds for
hypernetworks, declared once.

Field names follow the WebUI's saved settings JSON (``hypernetwork_name``, ``preview_prompt``,
``preview_negative_prompt``, ``preview_steps``, ``preview_cfg_scale``, ``preview_seed``, ``preview_width``,
``preview_height``), so a settings file the WebUI wrote loads with :func:`extensions_lib.options.from_dict`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..options import option
from ..sampling.samplers import SAMPLERS
from ..train.options import TrainingOptions

DEFAULT_LEARN_RATE = "0.00001"
"""The WebUI's "Hypernetwork Learning rate" default."""

DEFAULT_HYPERNETWORK_DIR = "models/hypernetworks"
"""The WebUI's default ``--hypernetwork-dir``."""

_HN, _PREVIEW = "Hypernetwork", "Preview"


@dataclass
class HypernetworkTrainOptions(TrainingOptions):
    hypernetwork_name: str = option("", label="Hypernetwork", group=_HN,
                                    help="the hypernetwork to train: a file name (without .pt) in the hypernetworks "
                                         "folder; create it first with 'alchemy hypernetwork create'")
    hypernetwork_dir: str = option(DEFAULT_HYPERNETWORK_DIR, label="Hypernetworks folder", group=_HN, ui=False,
                                   help="folder the hypernetwork is read from and the trained file is written to "
                                        "(the WebUI's --hypernetwork-dir)")
    # Same fields as the shared options, with the WebUI's hypernetwork defaults.
    learn_rate: str = option(DEFAULT_LEARN_RATE, label="Hypernetwork Learning rate", group="Optimisation",
                             help="a rate, or a schedule like '1e-5:1000, 5e-6' (rate until step); hypernetworks "
                                  "need tiny rates: embedding-style rates (0.005) turn them into noise")
    template_file: str = option("style_filewords", label="Prompt template", group="Dataset",
                                help="prompt template file (one prompt per line, [name] and [filewords] are filled "
                                     "in), or a shipped one: style, style_filewords, subject, subject_filewords, "
                                     "filewords")

    preview_prompt: str = option("", group=_PREVIEW, widget="textarea",
                                 help="prompt of the preview images (empty = the first prompt of the current batch, "
                                      "as the WebUI does)")
    preview_negative_prompt: str = option("", label="Preview negative prompt", group=_PREVIEW, widget="textarea",
                                          help="negative prompt of the preview images")
    preview_steps: int = option(20, minimum=1, maximum=150, step=1, group=_PREVIEW, help="sampling steps of a preview")
    preview_sampler: str = option("euler", choices=list(SAMPLERS), group=_PREVIEW, help="sampler of the previews")
    preview_cfg_scale: float = option(7.0, label="Preview CFG scale", minimum=1.0, maximum=30.0, step=0.5,
                                      group=_PREVIEW, help="classifier-free guidance scale of the previews")
    preview_seed: int = option(-1, group=_PREVIEW,
                               help="seed of the previews (-1 = a new one each time; fix it to compare previews)")
    preview_width: int = option(0, minimum=0, maximum=2048, step=8, group=_PREVIEW,
                                help="preview width in pixels (0 = the training width)")
    preview_height: int = option(0, minimum=0, maximum=2048, step=8, group=_PREVIEW,
                                 help="preview height in pixels (0 = the training height)")
