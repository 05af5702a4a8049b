"""``alchemy ui``: serve the training, tagging and txt2img tabs in a standalone gradio app."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..options import add_cli_arguments, from_cli, option

LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"


@dataclass
class UiCommand:
    ckpt: Optional[Path] = option(None, help="checkpoint to load (.safetensors or .ckpt); without it a tiny demo "
                                             "model is built into the cache folder (seconds, no download)")
    port: int = option(7861, help="port to serve on", minimum=1, maximum=65535)
    listen: bool = option(False, help="serve on every network interface (0.0.0.0); by default only this machine "
                                      "(127.0.0.1) can connect")
    data_dir: Path = option(Path("outputs") / "alchemy", help="folder holding embeddings/, hypernetworks/ and the "
                                                              "training logs")
    tagger_models_dir: Path = option(Path("models") / "tagger", help="folder with one sub-folder per tagger model")
    cache_dir: Optional[Path] = option(None, help="where the tiny demo model is kept [default: ~/.cache/alchemy]")
    device: str = option("auto", help="where the model runs: cpu, cuda, cuda:1, ...; auto = cuda when available")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ui", help="serve the training, tagging and txt2img tabs in your browser",
        description="Serve Alchemy's tabs (the same ones the WebUI extension shows) as a standalone app on the "
                    "standalone backend.")
    add_cli_arguments(parser, UiCommand)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..ui.app import ModelHolder, default_cache_dir, launch, standalone_context
    from ..jobs.thread_runner import ThreadJobRunner

    command = from_cli(UiCommand, args)
    model = ModelHolder(command.ckpt, command.cache_dir or default_cache_dir(), command.device)
    context = standalone_context(model, command.data_dir, command.tagger_models_dir)
    host = ALL_INTERFACES if command.listen else LOOPBACK
    print(f"alchemy ui: serving on http://{host}:{command.port} "
          f"({'tiny demo model' if model.is_demo else command.ckpt}; files in {command.data_dir})")
    if command.listen:
        print("alchemy ui: warning: --listen lets anyone who can reach this machine use the app, which reads and "
              "writes files wherever its folder fields point", file=sys.stderr)
    launch(ThreadJobRunner(), context, host=host, port=command.port, block=True)
    return 0
