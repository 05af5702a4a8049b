"""``alchemy make-tiny-model`` (tiny test checkpoints) and ``alchemy inspect`` (what a checkpoint holds)."""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from ..options import add_cli_arguments, from_cli, option

FAMILY_CHOICES = ("sd1", "sd2", "sd2-v")


@dataclass
class TinyModelOptions:
    family: str = option("sd1", help="model family to imitate", choices=FAMILY_CHOICES)
    seed: int = option(0, help="seed of the random weights", minimum=0)


def register(subparsers) -> None:
    tiny = subparsers.add_parser(
        "make-tiny-model", help="write a tiny random SD checkpoint for tests and demos",
        description="Write a tiny LDM-layout checkpoint with the real key structure and random weights "
                    "(.safetensors, or .ckpt as training checkpoints are).")
    tiny.add_argument("out", type=Path, metavar="OUT", help="output file (.safetensors or .ckpt)")
    add_cli_arguments(tiny, TinyModelOptions)
    tiny.set_defaults(func=run_make_tiny)

    inspect = subparsers.add_parser(
        "inspect", help="print what a checkpoint holds (JSON)",
        description="Detect a checkpoint's family and prediction type and print them with its parameter "
                    "counts and WebUI short hash as JSON.")
    inspect.add_argument("ckpt", type=Path, metavar="CKPT", help="checkpoint (.safetensors, .ckpt or .pt)")
    inspect.set_defaults(func=run_inspect)


def run_make_tiny(args: argparse.Namespace) -> int:
    from ..backend.tiny import make_tiny_checkpoint

    opts = from_cli(TinyModelOptions, args)
    print(make_tiny_checkpoint(args.out, family=opts.family, seed=opts.seed))
    return 0


def parameter_counts(reader, layout) -> dict[str, int]:
    """Parameters per diffusers component, from tensor shapes alone (nothing is loaded)."""
    import math

    from ..backend import keymap

    counts = {name: 0 for name in keymap.COMPONENTS}
    for key in reader.keys():
        pieces = keymap.ldm_to_diffusers(key, layout)
        if pieces[0].component in counts:
            counts[pieces[0].component] += math.prod(reader.shape(key))
    return counts


def inspect_checkpoint(path: Path) -> dict:
    """The facts ``alchemy inspect`` prints. SD2 files without a yaml get the UNet loaded for the probe."""
    from ..backend import keymap
    from ..backend.checkpoint import detect, open_checkpoint, short_hash
    from ..backend.standalone import choose_config, load_parts

    with open_checkpoint(path) as reader:
        detected = detect(reader)
        config = choose_config(detected, path)
        counts = parameter_counts(reader, keymap.Layout.from_config(config))
        stored = str(reader.dtype(keymap.UNET_PREFIX + "input_blocks.0.0.weight")).replace("torch.", "")
    if detected.prediction_type is None:
        loaded = load_parts(path, ("unet",), dtype=None)
        detected, config = loaded.detected, loaded.config
        del loaded
    return {
        "file": path.name,
        "family": config.family,
        "prediction_type": detected.prediction_type,
        "context_dim": detected.context_dim,
        "text_encoder": config.text_encoder_kind,
        "config": config.name,
        "detected_from": detected.source,
        "dtype": stored,
        "parameters": counts,
        "short_hash": short_hash(path),
    }


def run_inspect(args: argparse.Namespace) -> int:
    print(json.dumps(inspect_checkpoint(args.ckpt), indent=2))
    return 0
