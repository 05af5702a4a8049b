"""``alchemy ui``: serve the training, tagging and txt2img tabs in a standalone gradio app."""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import AlchemyError
from ..options import add_cli_arguments, from_cli, option

LOOPBACK = "127.0.0.1"
ALL_INTERFACES = "0.0.0.0"


@dataclass
class UiCommand:
    ckpt: Optional[Path] = option(None, help="checkpoint to load (.safetensors or .ckpt); without it a tiny demo "
                                             "model is built into the cache folder (seconds, no download)")
    port: int = option(7861, help="port to serve on", minimum=1, maximum=65535)
    listen: bool = option(False, help="serve on every network interface (0.0.0.0); by default only this machine "
                                      "(127.0.0.1) can connect. Needs --auth (or --insecure-listen)")
    auth: Optional[str] = option(None, help="USER:PASSWORD the browser must log in with (several: comma-separated)")
    insecure_listen: bool = option(False, help="with --listen, serve without --auth: anyone who can reach this "
                                               "machine can train, read and write files (not recommended)")
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


def parse_auth(text: str | None) -> list[tuple[str, str]]:
    """``"user:pass,other:pass2"`` -> [("user", "pass"), ("other", "pass2")]; AlchemyError when malformed."""
    pairs = []
    for item in (text or "").split(","):
        if not item.strip():
            continue
        user, sep, password = item.strip().partition(":")
        if not sep or not user or not password:
            raise AlchemyError("--auth must be USER:PASSWORD (several separated by commas)",
                               fix="e.g. --auth alice:correct-horse")
        pairs.append((user, password))
    return pairs


def run(args: argparse.Namespace) -> int:
    from ..cache_dir import default_cache_dir
    from ..ui.app import ModelHolder, launch, standalone_context
    from ..jobs.thread_runner import ThreadJobRunner

    command = from_cli(UiCommand, args)
    auth = parse_auth(command.auth)
    if command.listen and not auth and not command.insecure_listen:
        raise AlchemyError("--listen without --auth would let anyone who can reach this machine use the app",
                           fix="add --auth USER:PASSWORD (or --insecure-listen to serve without a login anyway)")
    model = ModelHolder(command.ckpt, command.cache_dir or default_cache_dir(), command.device)
    context = standalone_context(model, command.data_dir, command.tagger_models_dir)
    host = ALL_INTERFACES if command.listen else LOOPBACK
    print(f"alchemy ui: serving on http://{host}:{command.port} "
          f"({'tiny demo model' if model.is_demo else command.ckpt}; files in {command.data_dir})")
    if command.listen and not auth:
        print("alchemy ui: WARNING: --insecure-listen: NO LOGIN. Anyone who can reach this machine can use the "
              "app, which trains, reads and writes files wherever its folder fields point.", file=sys.stderr)
    launch(ThreadJobRunner(), context, host=host, port=command.port, block=True, auth=auth)
    return 0
