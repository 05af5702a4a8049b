"""What the training-method commands (``alchemy embedding``, ``alchemy hypernetwork``) share: actions
declared from option classes, and for ``train`` the options (from the flags, or a stopped run's), the
progress bar and the closing lines.

Not a command module itself: each method's registration (:mod:`extensions_lib.methods.registry`) names
its own.
"""
from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Callable, Iterator

from ..errors import AlchemyError
from ..options import add_cli_arguments, from_dict, specs


def add_action(actions, name: str, func: Callable[[argparse.Namespace], int], option_classes: tuple[type, ...],
               **texts: str) -> argparse.ArgumentParser:
    """A sub-command with a flag per option of each class, in that order; `texts` are ``help`` and
    ``description``."""
    parser = actions.add_parser(name, **texts)
    for cls in option_classes:
        add_cli_arguments(parser, cls)
    parser.set_defaults(func=func)
    return parser


def given_options(cls, args: argparse.Namespace, skip: tuple[str, ...] = ()) -> dict:
    """The options of `cls` given on the command line (a flag not given is None)."""
    return {s.name: getattr(args, s.name) for s in specs(cls)
            if s.name not in skip and getattr(args, s.name, None) is not None}


def training_options(cls, args: argparse.Namespace):
    """The options of a new run (seed resolved), or with ``--resume`` the saved ones overridden by the
    flags given."""
    from ..train.options import resolve_seed
    from ..train.resume import resume_options

    if getattr(args, "resume", None):
        return resume_options(args.resume, cls, given_options(cls, args, skip=("resume",)))
    return resolve_seed(from_dict(cls, given_options(cls, args), source="command line"))


def require_checkpoint(ckpt: Path | None) -> Path:
    if ckpt is None:
        raise AlchemyError("no checkpoint given", fix="pass --ckpt path/to/model.safetensors (the model to train on)")
    return ckpt


def device_name(name: str) -> str:
    """`name`, or for "auto" cuda when there is one, else cpu."""
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def step_bar(steps: int, desc: str) -> Iterator[Callable]:
    """A tqdm bar over the optimizer steps; yields the trainer callback that moves it (loss and rate beside
    it) and prints what a step saved or rendered above it."""
    from tqdm import tqdm

    bar = tqdm(total=steps, desc=desc, unit="step", dynamic_ncols=True)

    def progress(p) -> None:
        bar.total = p.max_steps
        bar.update(p.step - bar.n)
        if p.loss is not None:
            bar.set_postfix(loss=f"{p.loss:.4f}", lr=f"{p.lr:.2g}", refresh=False)
        for line in (p.message, p.saved and f"saved {p.saved}", p.preview and f"preview {p.preview}"):
            if line:
                bar.write(str(line))

    try:
        yield progress
    finally:
        bar.close()


def report_result(result, command: str, ckpt: Path) -> int:
    """Print the trained file, or the `command` (``embedding train``) that continues a stopped run; the exit
    code (130 when interrupted)."""
    if result.final_path is not None:
        print(result.final_path)
    elif result.resume_path is not None:
        print(f"stopped at step {result.step}; continue with: alchemy {command} --ckpt {ckpt} "
              f"--resume {result.log_dir}", file=sys.stderr)
    return 130 if result.interrupted else 0
