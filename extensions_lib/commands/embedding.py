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
from ..options import add_cli_arguments, from_cli, from_dict, option, specs

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

    create = actions.add_parser("create", help="write a new embedding from an initialization text",
                                description="Write <embeddings dir>/<name>.pt, its vectors taken from the token "
                                            "embeddings of the initialization text.")
    add_cli_arguments(create, CreateEmbeddingOptions)
    add_cli_arguments(create, ModelCommand)
    add_cli_arguments(create, FolderCommand)
    create.set_defaults(func=run_create)

    train = actions.add_parser("train", help="train an embedding on a folder of images",
                               description="Train an embedding of the embeddings folder on a folder of images. Ctrl-C "
                                           "stops at the next step and saves; --resume LOG_DIR continues exactly.")
    add_cli_arguments(train, ModelCommand)
    add_cli_arguments(train, EmbeddingTrainOptions)
    train.set_defaults(func=run_train)

    listing = actions.add_parser("list", help="list the embeddings of a folder (and why files are skipped)",
                                 description="List every embedding file below a folder; with --ckpt, files that do "
                                             "not fit that model are marked skipped with the reason.")
    add_cli_arguments(listing, FolderCommand)
    listing.add_argument("--ckpt", type=Path, default=None, help="check the files against this checkpoint")
    listing.set_defaults(func=run_list)


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

    loaded = load_parts(ckpt, ("text_encoder",), device=_device(device))
    config = loaded.config
    module = loaded.parts["text_encoder"]
    info = TextEncoderInfo(key="", width=int(config.text_encoder["hidden_size"]),
                           token_embedding=module.text_model.embeddings.token_embedding,
                           id_pad=49407 if config.text_encoder_kind == "clip" else 0)
    return TextEncoderOnly(config.family, make_tokenizer(config.text_encoder_kind), [info])


def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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

def _given(cls, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    return {s.name: getattr(args, s.name) for s in specs(cls)
            if s.name not in skip and getattr(args, s.name, None) is not None}


def training_options(args: argparse.Namespace):
    """The options of a new run (seed resolved), or with ``--resume`` the saved ones overridden by the
    flags given."""
    from ..embeddings.options import EmbeddingTrainOptions
    from ..train.options import resolve_seed
    from ..train.resume import resume_options

    if getattr(args, "resume", None):
        return resume_options(args.resume, EmbeddingTrainOptions, _given(EmbeddingTrainOptions, args, ("resume",)))
    return resolve_seed(from_dict(EmbeddingTrainOptions, _given(EmbeddingTrainOptions, args), source="command line"))


def run_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..backend.standalone import load_model
    from ..embeddings.method import check_schedules
    from ..embeddings.session import TrainingSession

    command = from_cli(ModelCommand, args)
    opts = training_options(args)
    if command.ckpt is None:
        raise AlchemyError("no checkpoint given", fix="pass --ckpt path/to/model.safetensors (the model to train on)")
    check_schedules(opts)  # before the slow model load
    adapter = load_model(command.ckpt, device=_device(command.device))
    with TrainingSession(adapter, opts) as session:
        return _train(session, opts, command, tqdm)


def _train(session, opts, command: ModelCommand, tqdm) -> int:
    with tqdm(desc="encoding latents", unit="image", dynamic_ncols=True) as bar:
        def encoded(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        method = session.prepare(on_progress=encoded)
    for skipped in method.data.dataset.skipped:
        print(f"alchemy: warning: skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    bar = tqdm(total=opts.steps, desc=f"training {opts.embedding_name}", unit="step", dynamic_ncols=True)

    def progress(p) -> None:
        bar.total = p.max_steps
        bar.update(p.step - bar.n)
        if p.loss is not None:
            bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2g}", refresh=False)
        for line in (p.message, p.saved and f"saved {p.saved}", p.preview and f"preview {p.preview}"):
            if line:
                bar.write(str(line))

    try:
        result = session.train(callbacks=progress)
    finally:
        bar.close()
    for warning in result.warnings:
        print(f"alchemy: warning: {warning}", file=sys.stderr)
    if result.final_path is not None:
        print(result.final_path)
    elif result.resume_path is not None:
        print(f"stopped at step {result.step}; continue with: alchemy embedding train --ckpt {command.ckpt} "
              f"--resume {result.log_dir}", file=sys.stderr)
    return 130 if result.interrupted else 0


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
