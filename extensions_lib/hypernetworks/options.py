"""The WebUI's "Create hypernetwork" options, declared once (defaults as its Create tab), and their
translation into an :class:`~.module.Architecture`."""
from __future__ import annotations

from dataclasses import dataclass, replace

from ..errors import AlchemyError
from ..names import check_name
from ..options import option
from .module import ACTIVATIONS, WEIGHT_INITS, Architecture, parse_dropout_structure

SIZE_CHOICES = [768, 1024, 320, 640, 1280]
"""Context widths offered by the host (its order): 768 SD1 text, 1024 SD2 text, 320/640/1280 UNet levels."""

# The host hides these two from its dropdown; "threshold" and "glu" are hidden here as well because they
# cannot work in this MLP (threshold needs constructor arguments, glu halves the width).
_HIDDEN_ACTIVATIONS = {"hardswish", "multiheadattention", "threshold", "glu"}
ACTIVATION_CHOICES = [name for name in ACTIVATIONS if name not in _HIDDEN_ACTIVATIONS]


@dataclass
class CreateHypernetworkOptions:
    name: str = option("", help="name of the new hypernetwork; the file is <hypernetworks folder>/<name>.pt")
    sizes: list[int] = option([768, 320, 640, 1280], label="Modules", choices=SIZE_CHOICES, multiple=True,
                              help="context widths to make modules for: 768 SD1 text, 1024 SD2 text, "
                                   "320/640/1280 UNet self-attention levels")
    layer_structure: str = option("1, 2, 1", label="Enter hypernetwork layer structure",
                                  help="width multipliers of the MLP layers; the first and last must be 1")
    activation: str = option("linear", choices=ACTIVATION_CHOICES,
                             label="Select activation function of hypernetwork. Recommended : Swish / Linear(none)",
                             help='activation after each hidden layer ("swish" is hardswish, as in the WebUI)')
    weight_init: str = option("Normal", choices=list(WEIGHT_INITS),
                              label="Select Layer weights initialization. Recommended: Kaiming for relu-like, "
                                    "Xavier for sigmoid-like, Normal otherwise",
                              help="how new layer weights are drawn")
    layer_norm: bool = option(False, label="Add layer normalization", help="a LayerNorm after every layer")
    use_dropout: bool = option(False, label="Use dropout", help="dropout between layers while training")
    dropout_structure: str = option("0, 0, 0", label="Enter hypernetwork Dropout structure (or empty). "
                                                     "Recommended : 0~0.35 incrementing sequence: 0, 0.05, 0.15",
                                    help="dropout probability per layer (with Use dropout); first and last are 0")
    activate_output: bool = option(False, help="also apply the activation after the last layer")
    last_layer_dropout: bool = option(False, help="with Use dropout and an empty dropout structure: also drop "
                                                  "out after the last hidden layer (0.3, the WebUI's default)")
    overwrite: bool = option(False, label="Overwrite Old Hypernetwork", help="replace an existing file of that name")


def parse_numbers(text: str, what: str) -> list[float]:
    """``"1, 2, 1"`` -> ``[1.0, 2.0, 1.0]`` (floats, as the host parses these fields)."""
    try:
        return [float(part.strip()) for part in text.split(",")]
    except ValueError:
        raise AlchemyError(f"{what} {text!r} is not a comma-separated list of numbers",
                           fix='write it like "1, 2, 1"') from None


def sanitize_name(name: str) -> str:
    """The host's file-name rule: keep letters, digits and ``._- ``; an empty result is an error."""
    clean = "".join(ch for ch in name if ch.isalnum() or ch in "._- ")
    if not clean:
        raise AlchemyError(f"hypernetwork name {name!r} is empty after removing characters a file name "
                           "cannot have", fix="use letters, digits, '.', '_', '-' or spaces")
    return check_name(clean, "hypernetwork name")


def architecture(opts: CreateHypernetworkOptions) -> Architecture:
    """The module architecture the options describe (dropout structure resolved as the host does)."""
    layer_structure = parse_numbers(opts.layer_structure, "layer structure")
    if opts.activation not in ACTIVATIONS:
        raise AlchemyError(f"unknown activation function {opts.activation!r}",
                           fix=f"use one of: {', '.join(ACTIVATION_CHOICES)}")
    arch = Architecture(layer_structure=layer_structure, activation_func=opts.activation,
                        add_layer_norm=opts.layer_norm, activate_output=opts.activate_output)
    arch.check()
    return replace(arch, dropout_structure=_dropout(opts, layer_structure))


def _dropout(opts: CreateHypernetworkOptions, layer_structure: list[float]) -> list[float]:
    if not opts.use_dropout:
        return [0] * len(layer_structure)
    if not opts.dropout_structure.strip():
        return parse_dropout_structure(layer_structure, True, opts.last_layer_dropout)
    dropout = parse_numbers(opts.dropout_structure, "dropout structure")
    if len(dropout) != len(layer_structure):
        raise AlchemyError(f"dropout structure {dropout} needs one entry per layer-structure entry "
                           f"({len(layer_structure)})", fix='e.g. "0, 0.05, 0" for "1, 2, 1"')
    if dropout[0] != 0 or dropout[-1] != 0:
        raise AlchemyError(f"dropout structure {dropout} must start and end with 0",
                           fix="dropout applies between layers only")
    if any(not 0 <= p < 1 for p in dropout):
        raise AlchemyError(f"dropout structure {dropout} has a probability outside [0, 1)", fix="use 0 to 0.35")
    if opts.last_layer_dropout and dropout[-2] == 0:
        raise AlchemyError("last layer dropout is on but the dropout structure has 0 before the output",
                           fix="set the second-to-last dropout value, or leave the structure empty")
    return dropout
