"""``alchemy hypernetwork create|train``, and the hypernetworks ``alchemy txt2img`` applies.

``create`` takes the WebUI's "Create hypernetwork" options; ``train`` the shared training options plus the
hypernetwork ones (``--resume LOG_DIR`` continues a stopped run exactly; options given with it override
the saved ones, e.g. ``--steps``). For txt2img, ``--hypernetwork NAME[:MULT]`` (repeatable) works like the
WebUI's hypernetwork setting: it adds ``<hypernet:NAME:MULT>`` unless the prompt already names NAME.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ..errors import AlchemyError
from ..options import add_cli_arguments, from_cli, from_dict, option, specs

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

    create = actions.add_parser("create", help="write a new, untrained hypernetwork",
                                description="Write <hypernetwork dir>/<name>.pt with the WebUI's create options.")
    add_cli_arguments(create, CreateHypernetworkOptions)
    add_cli_arguments(create, CreateCommand)
    create.set_defaults(func=run_create)

    train = actions.add_parser("train", help="train a hypernetwork on a folder of images",
                               description="Train a hypernetwork file on a folder of captioned images. Ctrl-C stops "
                                           "at the next step and saves; --resume LOG_DIR continues exactly.")
    add_cli_arguments(train, TrainCommand)
    add_cli_arguments(train, HypernetworkTrainOptions)
    train.set_defaults(func=run_train)


def run_create(args: argparse.Namespace) -> int:
    from ..hypernetworks.create import create_hypernetwork
    from ..hypernetworks.options import CreateHypernetworkOptions

    opts = from_cli(CreateHypernetworkOptions, args)
    command = from_cli(CreateCommand, args)
    print(create_hypernetwork(opts, command.dir))
    return 0


def _given(cls, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    return {s.name: getattr(args, s.name) for s in specs(cls)
            if s.name not in skip and getattr(args, s.name, None) is not None}


def training_options(args: argparse.Namespace):
    """The options of a new run, or with ``--resume`` the saved ones overridden by the flags given."""
    from ..hypernetworks.train_options import HypernetworkTrainOptions
    from ..train.resume import resume_options

    if args.resume:
        overrides = _given(HypernetworkTrainOptions, args, skip=("resume",))
        return resume_options(args.resume, HypernetworkTrainOptions, overrides)
    return from_dict(HypernetworkTrainOptions, _given(HypernetworkTrainOptions, args), source="command line")


def _say(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def run_train(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from ..backend.standalone import load_model
    from ..hypernetworks.method import load_for_training, train_hypernetwork

    command = from_cli(TrainCommand, args)
    opts = training_options(args)
    if command.ckpt is None:
        raise AlchemyError("no checkpoint given", fix="pass --ckpt path/to/model.safetensors (the model to train on)")
    load_for_training(opts)  # a missing or broken hypernetwork is reported before the slow model load
    device = command.device if command.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    adapter = load_model(command.ckpt, device=device)
    bar = tqdm(total=opts.steps, desc=f"training {opts.hypernetwork_name}", unit="step", dynamic_ncols=True)

    def progress(p) -> None:
        bar.total = p.max_steps
        bar.update(p.step - bar.n)
        if p.loss is not None:
            bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2g}", refresh=False)
        for line in (p.message, p.saved and f"saved {p.saved}", p.preview and f"preview {p.preview}"):
            if line:
                bar.write(str(line))

    try:
        result = train_hypernetwork(adapter, opts, callbacks=progress, say=_say)
    finally:
        bar.close()
    if result.final_path is not None:
        print(result.final_path)
    elif result.resume_path is not None:
        print(f"stopped at step {result.step}; continue with: alchemy hypernetwork train --ckpt {command.ckpt} "
              f"--resume {result.log_dir}", file=sys.stderr)
    return 130 if result.interrupted else 0


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
        if not self.chosen:
            return {}
        params = {"Hypernet": ", ".join(hn.name for hn, _ in self.chosen)}
        if any(mult != 1 for _, mult in self.chosen):
            params["Hypernet strength"] = ", ".join(f"{mult:g}" for _, mult in self.chosen)
        return params

    @contextlib.contextmanager
    def applied(self, adapter) -> Iterator[None]:
        """The hypernetworks patched into `adapter`'s attention for the block, removed afterwards."""
        if not self.chosen:
            yield
            return
        from ..hypernetworks.patch import apply_hypernetworks

        with apply_hypernetworks(self.chosen, adapter.attention_modules()) as patch:
            if patch.unused:
                print(f"alchemy: warning: {patch.summary()}", file=sys.stderr)
            yield


def txt2img_hypernetworks(flags: list[str] | None, directory: str | Path, prompt: str) -> Txt2ImgHypernetworks:
    """The prompt's ``<hypernet:NAME:MULT>`` tags, then each ``--hypernetwork`` whose name no tag names."""
    from ..hypernetworks.prompt import parse_hypernet_tags

    prompt, wanted = parse_hypernet_tags(prompt)
    named = {name for name, _ in wanted}
    wanted += [(name, mult) for name, mult in map(parse_hypernetwork_flag, flags or []) if name not in named]
    if not wanted:
        return Txt2ImgHypernetworks(prompt)
    from ..hypernetworks.file import read_hypernetwork
    from ..hypernetworks.library import find

    loaded: dict[str, object] = {}  # only the files asked for are read, each once
    for name, _ in wanted:
        if name not in loaded:
            loaded[name] = read_hypernetwork(find(directory, name))
    return Txt2ImgHypernetworks(prompt, [(loaded[name], mult) for name, mult in wanted])
