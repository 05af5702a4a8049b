"""The ``alchemy`` command line.

Each command lives in its own module exposing ``register(subparsers)``, which adds a parser whose
``func(args) -> int`` runs it. General modules are listed here once, each training method's in the method
registry; a module that fails to import (an optional dependency missing) only hides its own commands and
says why.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import AlchemyError, Cancelled

BEFORE_METHODS = [
    "extensions_lib.commands.models",      # make-tiny-model, inspect
    "extensions_lib.commands.generate",    # txt2img
]
AFTER_METHODS = [
    "extensions_lib.commands.dataset",     # tag, preprocess
    "extensions_lib.commands.demo",        # demo (the README's first command)
    "extensions_lib.commands.ui",          # ui (standalone gradio app)
]


def command_modules() -> list[str]:
    """Every command module: the general ones around each registered training method's
    (:mod:`extensions_lib.methods.registry`: ``alchemy embedding``, ``alchemy hypernetwork``, ...)."""
    from .methods.registry import methods

    return [*BEFORE_METHODS, *(m.cli for m in methods()), *AFTER_METHODS]


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    parser = argparse.ArgumentParser(
        prog="alchemy",
        description="Train and load Stable Diffusion embeddings, hypernetworks and more; tag datasets.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    problems = []
    for name in command_modules():
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # command not written yet: nothing to hide
                continue
            problems.append(f"{name.rsplit('.', 1)[-1]} commands unavailable: {exc}")
            continue
        module.register(sub)
    return parser, problems


def main(argv: list[str] | None = None) -> int:
    parser, problems = build_parser()
    args = parser.parse_args(argv)
    for line in problems:
        print(f"alchemy: {line}", file=sys.stderr)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except AlchemyError as exc:
        print(f"alchemy: error: {exc.message}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Cancelled):
        print("alchemy: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`, which closed early: not an error of ours
        sys.stderr.close()
        return 141
