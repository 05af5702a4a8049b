"""Hypernetwork training options: the shared training options plus what the WebUI's Train tab adds for
hypernetworks, declared once.

Field names follow the WebUI's saved settings JSON (``hypernetwork_name``, ``preview_from_txt2img`` and the
``preview_*`` fields), so a settings file the WebUI wrote loads with :func:`extensions_lib.options.from_dict`.
The preview fields are :class:`~extensions_lib.train.options.PreviewOptions`, as for embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..options import option
from ..train.options import TEMPLATE_HELP, PreviewOptions, TrainingOptions

DEFAULT_LEARN_RATE = "0.00001"
"""The WebUI's "Hypernetwork Learning rate" default."""

DEFAULT_HYPERNETWORK_DIR = "models/hypernetworks"
"""The WebUI's default ``--hypernetwork-dir``."""

_HN = "Hypernetwork"


@dataclass
class HypernetworkMethodOptions(TrainingOptions):
    """The shared training options with what hypernetwork training adds or defaults differently."""

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
                                help=TEMPLATE_HELP)

    clip_skip: int = option(1, minimum=1, maximum=12, step=1, group=_HN,
                            help="use the text encoder's N-th layer from the end while training (the WebUI's Clip "
                                 "skip setting; 1 = last)")


@dataclass
class HypernetworkTrainOptions(PreviewOptions, HypernetworkMethodOptions):
    """Everything the Train tab asks for a hypernetwork (previews last: see :class:`PreviewOptions`)."""
