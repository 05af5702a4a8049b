"""``alchemy hypernetwork create|train``, and the hypernetworks ``alchemy txt2img`` applies.

``create`` takes the WebUI's "Create hypernetwork" options; ``train`` the shared training options plus the
hypernetwork ones (``--resume LOG_DIR`` continues a stopped run exactly; options given with it override
the saved ones, e.g. ``--steps``). For txt2img, ``--hypernetwork NAME[:MULT]`` (repeatable) works like the
WebUI's hypernetwork setting: it adds ``<hypernet:NAME:MULT>`` unless the prompt already names NAME.
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..errors import AlchemyError
from ..options import from_cli, option
from .method_commands import add_action, report_result, require_checkpoint, step_bar, training_plan

DEFAULT_DIR = Path("models/hypernetworks")


@dataclass
class CreateCommand:
    dir: Path = option(DEFAULT_DIR, cli="--hypernetwork-dir", ui=False,
                       help="folder to write <name>.pt into (the WebUI's --hypernetwork-dir)")


@dataclass
class TrainCommand:
    ckpt: Optional[Path] = option(None, help="checkpoint to train on (.safetensors or .ckpt)", ui=False)
    device: str = option("auto", help="where to train: cpu, cuda, cuda:1, ...; auto = cuda when available", ui=False)


def register(subparsers) -> None:
    from ..hypernetworks.options import CreateHypernetworkOptions
    from ..hypernetworks.train_options import HypernetworkTrainOptions

    parser = subparsers.add_parser("hypernetwork", help="create and train hypernetworks",
                                   description="Create and train WebUI-compatible hypernetworks.")
    actions = parser.add_subparsers(dest="hypernetwork_action", metavar="ACTION")
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    add_action(actions, "create", run_create, (CreateHypernetworkOptions, CreateCommand),
               help="write a new, untrained hypernetwork",
               description="Write <hypernetwork dir>/<name>.pt with the WebUI's create options.")
    add_action(actions, "train", run_train, (TrainCommand, HypernetworkTrainOptions),
               help="train a hypernetwork on a folder of images",
               description="Train a hypernetwork file on a folder of captioned images. Ctrl-C stops at the next step "
                           "and saves; --resume LOG_DIR continues exactly.")


def run_create(args: argparse.Namespace) -> int:
    from ..hypernetworks.create import create_hypernetwork
    from ..hypernetworks.options import CreateHypernetworkOptions

    opts = from_cli(CreateHypernetworkOptions, args)
    command = from_cli(CreateCommand, args)
    print(create_hypernetwork(opts, command.dir))
    return 0


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def run_train(args: argparse.Namespace) -> int:
    from ..backend.standalone import load_model
    from ..hypernetworks.method import load_for_training, train_hypernetwork
    from ..hypernetworks.train_options import HypernetworkTrainOptions

    command = from_cli(TrainCommand, args)
    plan = training_plan(HypernetworkTrainOptions, args)
    opts = plan.options
    ckpt = require_checkpoint(command.ckpt)
    load_for_training(opts)  # a missing or broken hypernetwork is reported before the slow model load
    adapter = load_model(ckpt, device=command.device)
    with step_bar(opts.steps, f"training {opts.hypernetwork_name}") as progress:
        result = train_hypernetwork(adapter, plan, callbacks=progress, say=_say)
    return report_result(result, "hypernetwork train", ckpt)


# ---- txt2img ------------------------------------------------------------------------------------------

def parse_hypernetwork_flag(text: str) -> tuple[str, float]:
    """``NAME[:MULT]`` -> (name, multiplier); the multiplier defaults to 1, as the host's tag does."""
    from ..hypernetworks.prompt import parse_hypernet_tags

    _, found = parse_hypernet_tags(f"<hypernet:{text}>")
    if not found or not found[0][0]:
        raise AlchemyError(f"option --hypernetwork {text!r} is not NAME or NAME:MULTIPLIER",
                           fix="e.g. --hypernetwork anime:0.8")
    return found[0]


@dataclass
class Txt2ImgHypernetworks:
    """The hypernetworks one txt2img run applies, loaded before the model is."""

    prompt: str
    """The prompt without its ``<hypernet:...>`` tags (what the text encoder sees)."""
    chosen: list = field(default_factory=list)
    """(Hypernetwork, multiplier) in the order they chain."""

    @property
    def infotext(self) -> dict[str, str]:
        """Infotext entries: names and, when any is not 1, the strengths."""
        from ..generation import hypernetwork_infotext

        return hypernetwork_infotext(self.chosen)


def txt2img_hypernetworks(flags: list[str] | None, directory: str | Path, prompt: str) -> Txt2ImgHypernetworks:
    """The prompt's ``<hypernet:NAME:MULT>`` tags, then each ``--hypernetwork`` whose name no tag names."""
    from ..generation import choose_hypernetworks

    prompt, wanted = choose_hypernetworks(prompt, [parse_hypernetwork_flag(flag) for flag in flags or []])
    if not wanted:
        return Txt2ImgHypernetworks(prompt)
    from ..hypernetworks.file import read_hypernetwork
    from ..hypernetworks.library import find

    loaded: dict[str, object] = {}  # only the files asked for are read, each once
    for name, _ in wanted:
        if name not in loaded:
            loaded[name] = read_hypernetwork(find(directory, name))
    return Txt2ImgHypernetworks(prompt, [(loaded[name], mult) for name, mult in wanted])
