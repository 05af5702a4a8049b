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
from ..folders import check_folder
from ..options import from_cli, option
from .method_commands import add_action, report_result, require_checkpoint, step_bar, training_plan

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

    loaded = load_parts(ckpt, ("text_encoder",), device=device)
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
    check_folder(folder.embeddings_dir, "--embeddings-dir", must_exist=True)
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
    from ..embeddings.options import EmbeddingTrainOptions
    from ..embeddings.session import TrainingSession

    return train_in_session(args, EmbeddingTrainOptions, TrainingSession, "embedding train")


def train_in_session(args: argparse.Namespace, options_cls: type, session_cls: type, command_name: str,
                     check=None) -> int:
    """``train`` of a method built on :class:`~extensions_lib.embeddings.session.TrainingSession` (`session_cls`):
    the plan, and `check(options)`, before the slow model load."""
    from tqdm import tqdm

    from ..train.low_res_layers import load_for_training

    command = from_cli(ModelCommand, args)
    plan = training_plan(options_cls, args)
    opts = plan.options
    if check is not None:
        check(opts)
    ckpt = require_checkpoint(command.ckpt)
    if getattr(opts, "low_memory", False):
        from ..train.low_memory import load_low_memory
        adapter = load_low_memory(ckpt, device=command.device)
    else:       # the model is not used after training: its low-resolution layers are loaded as training has them
        adapter = load_for_training(ckpt, device=command.device, batch=getattr(opts, "batch_size", 1),
                                    latent_hw=(opts.training_height // 8, opts.training_width // 8))
    with session_cls(adapter, plan) as session:
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
        return report_result(result, command_name, ckpt)


# ---- txt2img ----------------------------------------------------------------------------------------------------

def txt2img_embeddings(adapter, directory: Path | None):
    """The :class:`~extensions_lib.embeddings.loader.EmbeddingLoader` of the embeddings folder one txt2img
    run uses (None without a folder); files it skips are reported."""
    if directory is None:
        return None
    check_folder(directory, "--embeddings-dir", must_exist=True)
    from ..embeddings.loader import EmbeddingLoader

    loader = EmbeddingLoader(adapter, directory)
    for entry in loader.library.skipped:
        print(f"alchemy: warning: embedding {entry.describe()}", file=sys.stderr)
    return loader
