"""Textual-inversion options, declared once: the WebUI's "Create embedding" tab, and its Train tab for
embeddings on top of the trainer core's shared options (with the Training settings that apply).

Names follow the keys of the WebUI's saved training-settings JSON where it has them (embedding_name,
save_image_with_stored_embedding, preview_*), so its files load with ``options.from_dict``.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..options import option
from ..prompt import CHUNK_LENGTH
from ..train.options import TEMPLATE_HELP, PreviewOptions, TrainingOptions

_EMB = "Embedding"


@dataclass
class CreateEmbeddingOptions:
    name: str = option("", help="name of the new embedding: the word prompts use, and its file name")
    init_text: str = option("*", label="Initialization text",
                            help="the vectors start as this text's token embeddings (empty = zeros)")
    num_vectors_per_token: int = option(1, label="Number of vectors per token", cli="--vectors",
                                        minimum=1, maximum=CHUNK_LENGTH, step=1,
                                        help="how many token slots the embedding fills in a prompt")
    overwrite: bool = option(False, label="Overwrite Old Embedding",
                             help="replace an existing embedding file of that name")


@dataclass
class EmbeddingMethodOptions(TrainingOptions):
    """The shared training options with what textual inversion adds or defaults differently."""

    # The WebUI's default template for embeddings (the core's default is subject_filewords).
    template_file: str = option("style_filewords", label="Prompt template", group="Dataset",
                                help=TEMPLATE_HELP)

    embedding_name: str = option("", label="Embedding", group=_EMB,
                                 help="the embedding to train, by name (a file in the embeddings folder)")
    embeddings_dir: str = option("embeddings", group=_EMB, ui=False,
                                 help="embeddings folder: the embedding is read from it and the trained one "
                                      "written back to its file")
    clip_skip: int = option(1, minimum=1, maximum=12, step=1, group=_EMB,
                            help="use the text encoder's N-th layer from the end while training (the WebUI's "
                                 "Clip skip setting; 1 = last)")
    offload_unused: bool = option(True, label="Move VAE and unused token embeddings out of memory when training",
                                  group=_EMB,
                                  help="once the latents are cached, training reads neither the VAE (but for previews) "
                                       "nor most rows of the token-embedding matrix: keep them in RAM (GPU) or a "
                                       "temporary file (CPU) meanwhile (like the WebUI's 'Move VAE and CLIP to RAM')")
    low_memory: bool = option(False, label="Low-memory training", group=_EMB,
                              help="keep the frozen UNet and text-encoder layer weights in 16 bits (about half the "
                                   "model's memory): on a CUDA GPU with bfloat16 or a CPU with AVX512-BF16/AMX "
                                   "(torch >= 2.4) stored and computed in bfloat16 (faster; results within about 1 "
                                   "percent of float32), elsewhere stored in float16 and computed in float32 layer by "
                                   "layer (the same values for float16 checkpoints; slower); the embedding and its "
                                   "optimizer stay float32; the choice is recorded in the run's provenance")
    save_image_with_stored_embedding: bool = option(True, label="Save images with embedding in PNG chunks",
                                                    group=_EMB,
                                                    help="with each preview, also write the embedding inside a PNG "
                                                         "(<log>/image_embeddings), loadable from the embeddings folder")


@dataclass
class EmbeddingTrainOptions(PreviewOptions, EmbeddingMethodOptions):
    """Everything the Train tab asks for an embedding (previews last: see :class:`PreviewOptions`)."""
