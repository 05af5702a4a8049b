"""``alchemy txt2img``: generate images from a checkpoint, saved as PNG with WebUI infotext."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

from ..errors import AlchemyError
from ..options import add_cli_arguments, from_cli, option
from ..sampling.infotext import save_png
from ..sampling.txt2img import GenerationOptions, check_options


@dataclass
class Txt2ImgCommand:
    """What the command needs beyond the generation settings."""

    ckpt: Optional[Path] = option(None, help="checkpoint to generate with (.safetensors or .ckpt)", ui=False)
    out: Path = option(Path("txt2img.png"), help="output PNG; a batch writes OUT-0.png, OUT-1.png, ...", ui=False)
    device: str = option("auto", help="where to run: cpu, cuda, cuda:1, ...; auto = cuda when available", ui=False)
    hypernetwork: list[str] = option([], multiple=True, ui=False,
                                     help="apply hypernetwork NAME[:MULT] (repeatable; chained in order), like "
                                          "<hypernet:NAME:MULT> in the prompt")
    hypernetwork_dir: Path = option(Path("models/hypernetworks"), ui=False,
                                    help="folder of hypernetworks (searched recursively)")
    lora: list[str] = option([], multiple=True, ui=False,
                             help="apply LoRA NAME[:W] (a kohya .safetensors in --lora-dir; repeatable), like "
                                  "<lora:NAME:W> in the WebUI")
    lora_dir: Path = option(Path("models/Lora"), ui=False, help="folder of LoRA files (searched recursively)")
    embeddings_dir: Optional[Path] = option(None, ui=False,
                                            help="folder of textual-inversion embeddings (searched recursively); "
                                                 "their file names become prompt words")
    aesthetic: str = option("", ui=False, help="apply aesthetic embedding NAME[:WEIGHT] (Aesthetic Gradients; the "
                                               "--aesthetic-* flags tune it)")
    aesthetic_dir: Path = option(Path("models/aesthetic_embeddings"), ui=False,
                                 help="folder of aesthetic embeddings (<name>.pt)")
    aesthetic_clip: str = option("", ui=False, help="SD1 only: CLIP ViT-L/14 (path or folder name in "
                                                    "models/aesthetic_clip) for its text projection; empty = default")
    aesthetic_download: bool = option(False, ui=False, help="download that CLIP model if missing (pinned revision)")


def register(subparsers) -> None:
    parser = subparsers.add_parser("txt2img", help="generate images from a prompt",
                                   description="Generate images; each PNG records its settings as the WebUI does.")
    add_cli_arguments(parser, Txt2ImgCommand)
    add_cli_arguments(parser, GenerationOptions)
    from ..aesthetic.options import AestheticOptions
    add_cli_arguments(parser, AestheticOptions, skip=("embedding",))
    parser.set_defaults(func=run)


def output_paths(out: Path, count: int) -> list[Path]:
    if out.suffix.lower() != ".png":
        raise AlchemyError("output must be a .png file", path=out, fix="give --out a name ending in .png")
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def run(args: argparse.Namespace) -> int:
    command = from_cli(Txt2ImgCommand, args)
    opts = from_cli(GenerationOptions, args)
    if command.ckpt is None:
        raise AlchemyError("no checkpoint given", fix="pass --ckpt path/to/model.safetensors")
    paths = output_paths(command.out, opts.batch_size)
    check_options(opts)  # before the (slow) model load
    from .hypernetwork import txt2img_hypernetworks
    hypernets = txt2img_hypernetworks(command.hypernetwork, command.hypernetwork_dir, opts.prompt)

    from tqdm import tqdm

    from ..backend.standalone import load_model
    from ..generation import generate_with_networks
    from .embedding import txt2img_embeddings

    adapter = load_model(command.ckpt, device=command.device)
    embeddings = txt2img_embeddings(adapter, command.embeddings_dir)
    from ..aesthetic.options import AestheticOptions
    from .aesthetic import Txt2ImgAesthetic
    aesthetic = Txt2ImgAesthetic(adapter, command.aesthetic, from_cli(AestheticOptions, args), command.aesthetic_dir,
                                 command.aesthetic_clip, download=command.aesthetic_download)
    opts = replace(opts, prompt=hypernets.prompt)
    warn = lambda line: print(f"alchemy: warning: {line}", file=sys.stderr)  # noqa: E731
    from ..dreambooth.apply import loras_applied

    with loras_applied(adapter, command.lora, command.lora_dir, warn), \
            tqdm(total=opts.steps, desc="txt2img", unit="step") as bar:
        images = generate_with_networks(adapter, opts, hypernetworks=hypernets.chosen, embeddings=embeddings,
                                        aesthetic=aesthetic, callback=lambda info: bar.update(1), refuse_nan=True,
                                        warn=warn)
    for image, path in zip(images, paths):
        save_png(image, path)
        print(path)
    return 0
