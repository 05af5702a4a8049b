"""``alchemy embedding create|train|list``: textual-inversion embeddings.

``create`` takes the WebUI's "Create embedding" options; ``train`` the shared training options plus the
embedding ones (Ctrl-C stops at the next step and saves; ``--resume LOG_DIR`` continues a stopped run
exactly, and options given with it override the saved ones, e.g. ``--steps``); ``list`` shows what an
embeddings folder holds and why files are skipped.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import AlchemyError
from ..options import from_cli, option
from .method_commands import add_action, device_name, report_result, require_checkpoint, step_bar, training_options

DEFAULT_DIR = Path("embeddings")


@dataclass
class ModelCommand:
    ckpt: Optional[Path] = option(None, help="checkpoint whose text encoder the embedding is for (.safetensors or "
                                             ".ckpt)", ui=False)
    device: str = option("auto", help="where to run: cpu, cuda, cuda:1, ...; auto = cuda when available", ui=False)


@dataclass
class FolderCommand:
    embeddings_dir: Path = option(DEFAULT_DIR, ui=False, help="embeddings folder (the WebUI's --embeddings-dir)")


def register(subparsers) -> None:
    from ..embeddings.options import CreateEmbeddingOptions, EmbeddingTrainOptions

    parser = subparsers.add_parser("embedding", help="create, train and list textual-inversion embeddings",
                                   description="Create and train WebUI-compatible textual-inversion embeddings.")
    actions = parser.add_subparsers(dest="embedding_action", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    add_action(actions, "create", run_create, (CreateEmbeddingOptions, ModelCommand, FolderCommand),
               help="write a new embedding from an initialization text",
               description="Write <embeddings dir>/<name>.pt, its vectors taken from the token embeddings of the "
                           "initialization text.")
    add_action(actions, "train", run_train, (ModelCommand, EmbeddingTrainOptions),
               help="train an embedding on a folder of images",
               description="Train an embedding of the embeddings folder on a folder of images. Ctrl-C stops at the "
                           "next step and saves; --resume LOG_DIR continues exactly.")
    listing = add_action(actions, "list", run_list, (FolderCommand,),
                         help="list the embeddings of a folder (and why files are skipped)",
                         description="List every embedding file below a folder; with --ckpt, files that do not fit "
                                     "that model are marked skipped with the reason.")
    listing.add_argument("--ckpt", type=Path, default=None, help="check the files against this checkpoint")


# ---- a model for create / list: the text encoder is all they need ----------------------------------------

@dataclass
class TextEncoderOnly:
    """The part of the ModelAdapter interface that creating and listing embeddings use."""

    family: str
    tokenizer: object
    text_encoders: list


def load_text_encoder(ckpt: Path | None, device: str = "cpu") -> TextEncoderOnly:
    if ckpt is None:
        raise AlchemyError("no checkpoint given", fix="pass --ckpt path/to/model.safetensors (the model the "
                                                      "embedding is for)")
    from ..adapter import TextEncoderInfo
    from ..backend.standalone import load_parts
    from ..backend.tokenizer import make_tokenizer

    loaded = load_parts(ckpt, ("text_encoder",), device=device_name(device))
    config = loaded.config
    module = loaded.parts["text_encoder"]
    info = TextEncoderInfo(key="", width=int(config.text_encoder["hidden_size"]),
                           token_embedding=module.text_model.embeddings.token_embedding,
                           id_pad=49407 if config.text_encoder_kind == "clip" else 0)
    return TextEncoderOnly(config.family, make_tokenizer(config.text_encoder_kind), [info])


# ---- create / list ------------------------------------------------------------------------------------------

def run_create(args: argparse.Namespace) -> int:
    from ..embeddings.create import check_name, create_embedding
    from ..embeddings.options import CreateEmbeddingOptions

    opts = from_cli(CreateEmbeddingOptions, args)
    folder = from_cli(FolderCommand, args)
    command = from_cli(ModelCommand, args)
    check_name(opts.name)  # before the model load
    model = load_text_encoder(command.ckpt, command.device)
    print(create_embedding(model, opts.name, opts.init_text, opts.num_vectors_per_token, opts.overwrite,
                           directory=folder.embeddings_dir))
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ..embeddings.library import EmbeddingLibrary, model_widths

    folder = from_cli(FolderCommand, args)
    if not folder.embeddings_dir.is_dir():
        raise AlchemyError("embeddings folder not found", folder.embeddings_dir, "give --embeddings-dir DIR")
    if args.ckpt is not None:
        model = load_text_encoder(args.ckpt)
        library = EmbeddingLibrary(folder.embeddings_dir, model_widths(model), model.tokenizer)
    else:
        library = EmbeddingLibrary(folder.embeddings_dir)
    for entry in library.entries():
        print(entry.describe())
    return 0


# ---- train ----------------------------------------------------------------------------------------------------

def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..backend.standalone import load_model
    from ..embeddings.method import check_schedules
    from ..embeddings.options import EmbeddingTrainOptions
    from ..embeddings.session import TrainingSession

    command = from_cli(ModelCommand, args)
    opts = training_options(EmbeddingTrainOptions, args)
    ckpt = require_checkpoint(command.ckpt)
    check_schedules(opts)  # before the slow model load
    if opts.low_memory:
        from ..train.low_memory import load_low_memory
        adapter = load_low_memory(ckpt, device=device_name(command.device))
    else:
        adapter = load_model(ckpt, device=device_name(command.device))
    with TrainingSession(adapter, opts) as session:
        with tqdm(desc="encoding latents", unit="image", dynamic_ncols=True) as bar:
            def encoded(done: int, total: int) -> None:
                bar.total = total
                bar.update(done - bar.n)
            method = session.prepare(on_progress=encoded)
        for skipped in method.data.dataset.skipped:
            print(f"alchemy: warning: skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
        with step_bar(opts.steps, f"training {opts.embedding_name}") as progress:
            result = session.train(callbacks=progress)
        for warning in result.warnings:
            print(f"alchemy: warning: {warning}", file=sys.stderr)
        return report_result(result, "embedding train", ckpt)


# ---- txt2img ----------------------------------------------------------------------------------------------------

class Txt2ImgEmbeddings:
    """The embeddings folder one txt2img run uses (none when `directory` is None): a context manager that
    patches the text encoder, with the ``encode_fn`` and infotext entries generation takes."""

    def __init__(self, adapter, directory: Path | None):
        self.loader = None
        if directory is None:
            return
        if not Path(directory).is_dir():
            raise AlchemyError("embeddings folder not found", directory, "give --embeddings-dir an existing folder")
        from ..embeddings.loader import EmbeddingLoader

        self.loader = EmbeddingLoader(adapter, directory)
        for entry in self.loader.library.skipped:
            print(f"alchemy: warning: embedding {entry.describe()}", file=sys.stderr)

    def __enter__(self) -> "Txt2ImgEmbeddings":
        if self.loader is not None:
            self.loader.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.loader is not None:
            self.loader.__exit__(*exc)

    @property
    def encode_fn(self):
        return self.loader.encode if self.loader is not None else None

    def infotext(self, prompts: list[str]) -> dict[str, str]:
        return self.loader.infotext_params(prompts) if self.loader is not None else {}
