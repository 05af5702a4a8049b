"""``alchemy aesthetic create|list``: aesthetic embeddings (Aesthetic Gradients) from image folders.

``alchemy txt2img --aesthetic NAME[:WEIGHT]`` applies one (see ``commands/generate.py``).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from ..aesthetic.clip_models import DEFAULT_CLIP_DIR
from ..aesthetic.file import DEFAULT_DIR
from ..options import add_cli_arguments, from_cli, option


@dataclass
class FolderCommand:
    aesthetic_dir: Path = option(DEFAULT_DIR, ui=False, help="folder of aesthetic embeddings (<name>.pt)")
    clip_dir: Path = option(DEFAULT_CLIP_DIR, ui=False,
                            help="folder of CLIP models (downloads go here, one folder per model)")
    device: str = option("auto", ui=False, help="where to encode: cpu, cuda, ...; auto = cuda when available")


def register(subparsers) -> None:
    from ..aesthetic.options import CreateOptions

    parser = subparsers.add_parser("aesthetic", help="create aesthetic embeddings (Aesthetic Gradients)",
                                   description="Aesthetic embeddings: the look of an image folder, applied at "
                                               "generation with 'alchemy txt2img --aesthetic NAME[:WEIGHT]'.")
    actions = parser.add_subparsers(dest="aesthetic_action", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)
    create = actions.add_parser("create", help="embed a folder of images",
                                description="Average the normalised CLIP image features of the images in a folder "
                                            "(ViT-L/14 for SD1, OpenCLIP ViT-H/14 for SD2) into "
                                            "<aesthetic dir>/<name>.pt, the original extension's format.")
    add_cli_arguments(create, CreateOptions)
    add_cli_arguments(create, FolderCommand)
    create.set_defaults(func=run_create)
    listing = actions.add_parser("list", help="list the aesthetic embeddings in the folder")
    add_cli_arguments(listing, FolderCommand, skip=("clip_dir", "device"))
    listing.set_defaults(func=run_list)


def run_create(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..aesthetic.create import create_from_options
    from ..aesthetic.options import CreateOptions

    opts = from_cli(CreateOptions, args)
    folders = from_cli(FolderCommand, args)
    device = folders.device if folders.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    with tqdm(desc="aesthetic create", unit="img") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)
        path, result = create_from_options(opts, folders.aesthetic_dir, folders.clip_dir, progress,
                                           report=lambda line: print(f"alchemy: {line}", file=sys.stderr),
                                           device=device)
    for skipped, reason in result.skipped:
        print(f"alchemy: skipped {skipped}: {reason}", file=sys.stderr)
    print(f"{path} ({result.used} images, {result.vector.shape[0]} dimensions)")
    return 0


def run_list(args: argparse.Namespace) -> int:
    from ..aesthetic.file import AestheticLibrary

    folders = from_cli(FolderCommand, args)
    library = AestheticLibrary(folders.aesthetic_dir)
    for name in library.usable():
        print(f"{name}\t{library.load(name).dim}")
    for name, reason in library.skipped.items():
        print(f"alchemy: skipped {name}: {reason}", file=sys.stderr)
    return 0


# ---- txt2img ----------------------------------------------------------------------------------------------------

class Txt2ImgAesthetic:
    """The aesthetic embedding one txt2img run applies (none when `spec` is empty): a context manager with the
    ``encode_fn`` wrapper and infotext entries generation takes."""

    def __init__(self, adapter, spec: str, options, folder: Path, clip: str, clip_dir: Path = DEFAULT_CLIP_DIR,
                 download: bool = False):
        from dataclasses import replace

        from ..aesthetic.file import AestheticLibrary
        from ..aesthetic.standalone import StandaloneAesthetic, parse_aesthetic_arg

        self.aesthetic = None
        if not spec:
            return
        name, weight = parse_aesthetic_arg(spec)
        options = replace(options, embedding=name, **({"weight": weight} if weight is not None else {}))
        embedding = AestheticLibrary(folder).load(name)
        clip_path = None
        if adapter.family == "sd1":
            from ..aesthetic.clip_models import resolve_clip

            clip_path = resolve_clip(clip, "sd1", clip_dir, download=download,
                                     report=lambda line: print(f"alchemy: {line}", file=sys.stderr))
        self.aesthetic = StandaloneAesthetic(adapter, embedding, options, clip_path=clip_path)

    def __enter__(self) -> "Txt2ImgAesthetic":
        if self.aesthetic is not None:
            self.aesthetic.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.aesthetic is not None:
            self.aesthetic.__exit__(*exc)

    def encode_fn(self, base, negative: str):
        return self.aesthetic.encode_fn(base, negative) if self.aesthetic is not None else base

    def infotext(self) -> dict[str, str]:
        return self.aesthetic.infotext() if self.aesthetic is not None else {}
