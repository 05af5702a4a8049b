"""APT options, declared once: the Create tab (the pair of embeddings) and the Train tab (textual
inversion's options with DreamArtist's defaults and what APT adds)."""
from __future__ import annotations

from dataclasses import dataclass

from ..embeddings.options import EmbeddingMethodOptions
from ..options import option
from ..prompt import CHUNK_LENGTH
from ..train.options import PreviewOptions

_APT = "APT"
NEG_SUFFIX = "-neg"


@dataclass
class AptCreateOptions:
    name: str = option("", help=f"name of the positive embedding; the negative one is <name>{NEG_SUFFIX}")
    init_text: str = option("*", label="Initialization text",
                            help="the positive vectors start as this text's token embeddings (empty = zeros)")
    init_text_neg: str = option("*", label="Initialization text (negative)",
                                help="the negative vectors start as this text's token embeddings (empty = zeros)")
    num_vectors_per_token: int = option(3, label="Number of vectors per token", cli="--vectors",
                                        minimum=1, maximum=CHUNK_LENGTH, step=1,
                                        help="token slots the positive embedding fills in a prompt")
    num_vectors_per_token_neg: int = option(6, label="Number of negative vectors per token", cli="--neg-vectors",
                                            minimum=1, maximum=CHUNK_LENGTH, step=1,
                                            help="token slots the negative embedding fills in a prompt")
    neg_noise: float = option(1e-3, label="Negative start noise", minimum=0.0,
                              help="standard deviation of the noise added to the negative vectors, so they do not "
                                   "start equal to the positive ones")
    seed: int = option(-1, help="seed of that noise (-1 = a random one)")
    file_format: str = option("pt", choices=["pt", "safetensors"], label="File format",
                              help="pt: loads in every WebUI; safetensors: no pickle (SDXL pairs are always safetensors)")
    overwrite: bool = option(False, label="Overwrite Old Embedding",
                             help="replace existing embedding files of those names")


@dataclass
class AptMethodOptions(EmbeddingMethodOptions):
    """Textual inversion's training options with DreamArtist's defaults, plus APT's own."""

    template_file: str = option("subject", label="Prompt template", group="Dataset",
                                help="prompt template file (one prompt per line, [name] and [filewords] are filled "
                                     "in), or a shipped one: style, style_filewords, subject, subject_filewords")
    steps: int = option(8000, label="Max steps", help="stop after this many optimizer steps", minimum=1, group="Run")
    learn_rate: str = option("0.003", label="Learning rate", group="Optimisation",
                             help="a rate, or a schedule like '0.005:100, 1e-3:1000, 1e-5' (rate until step; "
                                  "training ends when the schedule does)")
    log_directory: str = option("dream_artist", label="Log directory", group="Saving and logging",
                                help="runs are logged in <log directory>/<YYYY-MM-DD>/<name>/")
    create_image_every: int = option(100, label="Save a preview image every N steps", minimum=0,
                                     group="Saving and logging", help="render a preview every N steps (0 = never)")
    save_optimizer_state: bool = option(False, group="Saving and logging", ui=False,
                                        help="not available for APT (the optimizer spans both embeddings): its state "
                                             "is kept in the resume state instead")

    embedding_name: str = option("", label="Embedding", group="Embedding",
                                 help=f"the positive embedding to train; <name>{NEG_SUFFIX} is trained with it")
    cfg_scale: str = option("3.0", label="CFG scale", group=_APT,
                            help="guidance inside the loss: a scale, or 'low-high[:curve]' rising with the noise "
                                 "level (curves ln, cos, cos2, sqrt), e.g. '1.5-3:cos'")
    neg_lr_scale: float = option(1.0, label="Negative lr weight", minimum=0.2, maximum=5.0, step=0.1, group=_APT,
                                 help="the negative embedding learns at the learning rate times this, at every step")
    embedding_clip_norm: float = option(1.0, label="Clip each embedding's gradient norm", minimum=0.0, group=_APT,
                                        help="clip the gradient norm of each embedding to this before every update "
                                             "(0 = off)")
    attention_masks: bool = option(True, label="Attention maps", group=_APT,
                                   help="weight the loss per pixel by <image>_att masks beside the images (black 0, "
                                        "mid grey 1, white 5)")
    reconstruction: bool = option(False, label="Reconstruction loss", group=_APT,
                                  help="also decode the guided clean-image estimate and add its L1 distance to the "
                                       "image (slower, more memory)")
    reconstruction_weight: float = option(1.0, label="Reconstruction loss weight", minimum=0.01, maximum=1.0,
                                          step=0.01, group=_APT, help="weight of the reconstruction loss")
    decoder_checkpointing: bool = option(True, group=_APT,
                                         help="with reconstruction: recompute the VAE decoder's blocks in the "
                                              "backward pass instead of keeping their activations (less memory)")
    ema_decay: float = option(1.0, label="EMA (positive)", minimum=0.0, maximum=1.0, step=0.01, group=_APT,
                              help="exponential moving average of the positive vectors (1 = off; 0.97 steadies "
                                   "erratic runs)")
    ema_replace_every: int = option(25, label="EMA replace steps (positive)", minimum=1, group=_APT,
                                    help="every N steps the positive vectors are replaced by their average")
    ema_decay_neg: float = option(1.0, label="EMA (negative)", minimum=0.0, maximum=1.0, step=0.01, group=_APT,
                                  help="the same for the negative vectors (1 = off)")
    ema_replace_every_neg: int = option(25, label="EMA replace steps (negative)", minimum=1, group=_APT,
                                        help="every N steps the negative vectors are replaced by their average")


@dataclass
class AptTrainOptions(PreviewOptions, AptMethodOptions):
    """Everything the APT Train tab asks for (previews last: see :class:`PreviewOptions`)."""
