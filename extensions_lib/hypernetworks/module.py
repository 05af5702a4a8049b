"""The WebUI's hypernetwork, layer for layer.

A hypernetwork holds, for each context width it was made for (320/640/1280 = UNet self-attention widths,
768 = SD1 text context, 1024 = SD2), a pair of small residual MLPs: one rewrites the context before
``to_k``, the other before ``to_v``. Module structure, state-dict key names, initialisation and the
quirks below follow WebUI v1.10.1 so that its ``.pt`` files load here and ours load there.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Iterator, Mapping, Sequence

import torch
from torch import nn

from ..errors import AlchemyError


def _activation_classes() -> Mapping[str, type[nn.Module]]:
    # The host's table: a few hand-picked names first, then every class of torch.nn.modules.activation
    # under its lower-cased class name. "swish" is nn.Hardswish there, not SiLU: files trained with
    # "swish" were trained with hardswish, so that is what must run here too.
    table: dict[str, type[nn.Module]] = {
        "linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
        "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    }
    for cls_name, cls in inspect.getmembers(torch.nn.modules.activation, inspect.isclass):
        if cls.__module__ == "torch.nn.modules.activation":
            table[cls_name.lower()] = cls
    return MappingProxyType(table)


ACTIVATIONS = _activation_classes()
"""Activation name (as stored in ``activation_func``) -> module class, exactly as the WebUI resolves it."""

WEIGHT_INITS = ("Normal", "KaimingUniform", "KaimingNormal", "XavierUniform", "XavierNormal")
"""Weight initialisations by the WebUI's names, in the order of its Create tab."""


def parse_dropout_structure(layer_structure: Sequence[float], use_dropout: bool,
                            last_layer_dropout: bool) -> list[float]:
    """The dropout structure the WebUI derives for files that do not store one.

    No dropout -> all zeros; otherwise 0.3 after every hidden layer but the last, which gets 0.3 only
    with `last_layer_dropout`; the output never has dropout.
    """
    n = len(layer_structure)
    if not use_dropout:
        return [0] * n
    return [0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0] + [0]


@dataclass(frozen=True)
class Architecture:
    """What the MLPs of a hypernetwork look like (shared by every width and by k and v).

    layer_structure: width multipliers, first and last must be 1 (e.g. ``(1, 2, 1)``).
    activation_func: a key of :data:`ACTIVATIONS`; None or "linear" means none.
    add_layer_norm: a LayerNorm after every Linear (the last one included).
    activate_output: also put the activation after the last Linear.
    dropout_structure: dropout probability after each Linear (index i+1 follows Linear i); None = none.
    """

    layer_structure: tuple[float, ...] = (1, 2, 1)
    activation_func: str | None = None
    add_layer_norm: bool = False
    activate_output: bool = False
    dropout_structure: tuple[float, ...] | None = None

    def __post_init__(self):
        # Keep the stored element types (int 0 vs float 0.0) so a file re-saves exactly as read.
        object.__setattr__(self, "layer_structure", tuple(self.layer_structure))
        if self.dropout_structure is not None:
            object.__setattr__(self, "dropout_structure", tuple(self.dropout_structure))

    def check(self) -> None:
        """Raise AlchemyError for a structure the WebUI would refuse (it asserts these)."""
        ls = self.layer_structure
        if len(ls) < 2 or any(not isinstance(v, (int, float)) or isinstance(v, bool) for v in ls):
            raise AlchemyError(f"layer structure {list(ls)} must be at least two numbers",
                               fix='use e.g. "1, 2, 1"')
        if ls[0] != 1 or ls[-1] != 1:
            raise AlchemyError(f"layer structure {list(ls)} must start and end with 1",
                               fix='the first and last multipliers are the context width itself, e.g. "1, 2, 1"')
        if any(not math.isfinite(v) or v <= 0 for v in ls):
            raise AlchemyError(f"layer structure {list(ls)} has a multiplier that is not a positive number",
                               fix="use positive multipliers")
        ds = self.dropout_structure
        if ds is not None:
            # Longer is allowed: the host derives [0, p, 0] for a legacy single-layer [1, 1] file and uses
            # only the entries after each Linear.
            if len(ds) < len(ls):
                raise AlchemyError(f"dropout structure {list(ds)} must have (at least) as many entries as the "
                                   f"layer structure {list(ls)}", fix='e.g. "0, 0.05, 0" for "1, 2, 1"')
            for p in ds[1:len(ls)]:
                if not math.isfinite(p) or (p > 0 and not p < 1):  # the host asserts 0 < p < 1 for every non-zero entry it uses
                    raise AlchemyError(f"dropout probability {p} in {list(ds)} must be below 1",
                                       fix="use values in [0, 1), e.g. 0.05 to 0.35")


def _make_activation(name: str) -> nn.Module:
    cls = ACTIVATIONS.get(name)
    if cls is None:
        raise AlchemyError(f"unknown activation function {name!r}",
                           fix=f"use one of: {', '.join(ACTIVATIONS)}")
    try:
        return cls()
    except TypeError:  # e.g. Threshold, MultiheadAttention: the host calls the class without arguments
        raise AlchemyError(f"activation function {name!r} cannot be built without arguments",
                           fix="pick another activation (e.g. relu, swish, linear)") from None


def build_layers(dim: int, arch: Architecture) -> list[nn.Module]:
    """The host's ``nn.Sequential`` contents: Linear, [activation], [LayerNorm], [Dropout] per step.

    The positions matter: they become the ``linear.<index>`` state-dict keys of the file.
    """
    arch.check()
    ls, ds = arch.layer_structure, arch.dropout_structure
    layers: list[nn.Module] = []
    for i in range(len(ls) - 1):
        width_in, width_out = int(dim * ls[i]), int(dim * ls[i + 1])
        if width_out < 1:
            raise AlchemyError(f"layer structure {list(ls)} makes a layer of width 0 for context width {dim}",
                               fix="use larger multipliers")
        layers.append(nn.Linear(width_in, width_out))
        is_last = i >= len(ls) - 2
        if arch.activation_func not in (None, "linear") and not (is_last and not arch.activate_output):
            layers.append(_make_activation(arch.activation_func))
        if arch.add_layer_norm:
            layers.append(nn.LayerNorm(width_out))
        if ds is not None and ds[i + 1] > 0:
            layers.append(nn.Dropout(p=ds[i + 1]))
    return layers


@torch.no_grad()
def initialise_(layers: nn.Sequential, weight_init: str, activation_func: str | None) -> None:
    """Initialise a new module's Linear and LayerNorm layers the way the WebUI does."""
    if weight_init not in WEIGHT_INITS:
        raise AlchemyError(f"unknown weight initialisation {weight_init!r}", fix=f"use one of: {', '.join(WEIGHT_INITS)}")
    nonlinearity = "leaky_relu" if activation_func == "leakyrelu" else "relu"
    for layer in layers:
        if type(layer) not in (nn.Linear, nn.LayerNorm):
            continue
        # Host quirk kept on purpose: LayerNorm gets the "Normal" branch too (weight ~ N(0, 0.01), not 1).
        # The bias is drawn with std 0 rather than zeroed so the RNG advances exactly as in the host.
        if weight_init == "Normal" or type(layer) is nn.LayerNorm:
            nn.init.normal_(layer.weight, mean=0.0, std=0.01)
            nn.init.normal_(layer.bias, mean=0.0, std=0.0)
            continue
        if weight_init == "XavierUniform":
            nn.init.xavier_uniform_(layer.weight)
        elif weight_init == "XavierNormal":
            nn.init.xavier_normal_(layer.weight)
        elif weight_init == "KaimingUniform":
            nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
        else:
            nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
        nn.init.zeros_(layer.bias)


def upgrade_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the keys of very old files (``linear1.*``/``linear2.*``) to the ``linear.<i>.*`` layout."""
    renames = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
               "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
    return {renames.get(k, k): v for k, v in state_dict.items()}


class HypernetworkModule(nn.Module):
    """One residual MLP: ``x + linear(x) * multiplier`` (multiplier ignored, i.e. 1, while training).

    The only child is ``linear`` (an ``nn.Sequential``), so ``state_dict()`` has exactly the host's keys.
    weight_init: initialise as a new module; None leaves torch's defaults (a state dict follows).
    """

    def __init__(self, dim: int, arch: Architecture, weight_init: str | None = "Normal"):
        super().__init__()
        self.dim = dim
        self.multiplier = 1.0
        self.linear = nn.Sequential(*build_layers(dim, arch))
        if weight_init is not None:
            initialise_(self.linear, weight_init, arch.activation_func)

    def forward(self, x: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
        return x + self.linear(x) * self.effective_multiplier(multiplier)

    def effective_multiplier(self, multiplier: float | None = None) -> float:
        """The strength `forward` uses: 1 while training (as in the host), else `multiplier` or the set one."""
        if self.training:
            return 1.0
        return self.multiplier if multiplier is None else multiplier

    def trainables(self) -> list[nn.Parameter]:
        """Weights and biases of the Linear and LayerNorm layers (what the host's optimizer trains)."""
        return [p for layer in self.linear if type(layer) in (nn.Linear, nn.LayerNorm)
                for p in (layer.weight, layer.bias)]


ModulePair = tuple[HypernetworkModule, HypernetworkModule]


@dataclass
class Hypernetwork:
    """A loaded or new hypernetwork: one (k, v) module pair per context width, plus the file's metadata.

    Field names follow the host's ``Hypernetwork`` object; :mod:`.file` maps them to the ``.pt`` keys.
    """

    name: str
    arch: Architecture
    layers: dict[int, ModulePair] = field(default_factory=dict)
    weight_init: str = "Normal"
    use_dropout: bool = False
    step: int = 0
    sd_checkpoint: str | None = None
    sd_checkpoint_name: str | None = None
    optional_info: str | None = None
    optimizer_name: str | None = None
    optimizer_state_dict: dict | None = None
    filename: str | None = None

    @classmethod
    def create(cls, name: str, sizes: Sequence[int], arch: Architecture, weight_init: str = "Normal",
               use_dropout: bool = False) -> "Hypernetwork":
        """A new hypernetwork with freshly initialised modules for each width in `sizes` (in eval mode).

        Without a dropout structure in `arch` one is derived as the host's constructor does.
        """
        if arch.dropout_structure is None:
            arch = replace(arch, dropout_structure=parse_dropout_structure(arch.layer_structure, use_dropout, True))
        layers = {int(size): (HypernetworkModule(int(size), arch, weight_init),
                              HypernetworkModule(int(size), arch, weight_init)) for size in sizes}
        hn = cls(name=name, arch=arch, layers=layers, weight_init=weight_init, use_dropout=use_dropout)
        hn.eval()
        return hn

    @property
    def sizes(self) -> list[int]:
        return list(self.layers)

    @property
    def last_layer_dropout(self) -> bool:
        """What the host saves as ``last_layer_dropout``: whether the last hidden layer has dropout."""
        ds = self.arch.dropout_structure
        return bool(ds is not None and len(ds) >= 2 and ds[-2] != 0)

    def modules(self) -> Iterator[HypernetworkModule]:
        for pair in self.layers.values():
            yield from pair

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]

    def train(self, mode: bool = True) -> "Hypernetwork":
        """Training mode: dropout on, multiplier ignored, gradients on (the host's ``train``)."""
        for m in self.modules():
            m.train(mode)
            for p in m.parameters():
                p.requires_grad_(mode)
        return self

    def eval(self) -> "Hypernetwork":
        return self.train(False)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Hypernetwork":
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        return self

    def set_multiplier(self, multiplier: float) -> "Hypernetwork":
        for m in self.modules():
            m.multiplier = multiplier
        return self
