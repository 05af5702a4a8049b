"""The WebUI's hypernetwork ``.pt`` file and its ``.pt.optim`` side file.

Layout (a pickled dict, as ``Hypernetwork.save`` writes it in WebUI v1.10.1):

- one integer key per context width -> ``(state_dict_k, state_dict_v)`` of the two modules;
- then, in this order: ``step`` int, ``name`` str, ``layer_structure`` list, ``activation_func`` str|None,
  ``is_layer_norm`` bool, ``weight_initialization`` str, ``sd_checkpoint`` str|None,
  ``sd_checkpoint_name`` str|None, ``activate_output`` bool, ``use_dropout`` bool, ``dropout_structure``
  list, ``last_layer_dropout`` bool, ``optional_info`` str|None.

Missing keys take the host's load defaults (note ``activate_output`` defaults to True on load). The
optimizer is never in the ``.pt``: ``<file>.pt.optim`` holds ``optimizer_name``, ``hash`` (sha256[:10]
of the ``.pt``) and ``optimizer_state_dict``; its state is used only while the hash matches.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import AlchemyError
from ..names import is_valid_name
from ..safe_pickle import safe_load
from .module import Architecture, Hypernetwork, HypernetworkModule, parse_dropout_structure, upgrade_state_dict

METADATA_KEYS = ("step", "name", "layer_structure", "activation_func", "is_layer_norm", "weight_initialization",
                 "sd_checkpoint", "sd_checkpoint_name", "activate_output", "use_dropout", "dropout_structure",
                 "last_layer_dropout", "optional_info")
"""The host's top-level string keys, in the order it writes them."""

OPTIM_SUFFIX = ".optim"


def shorthash(path: str | os.PathLike) -> str:
    """The host's short hash of a file: the first 10 hex digits of its sha256."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


# ---- dict <-> Hypernetwork --------------------------------------------------------------------------

def _module_state(module: HypernetworkModule) -> dict:
    state = module.state_dict()  # an OrderedDict carrying `_metadata`, exactly what the host pickles
    for key, tensor in state.items():
        state[key] = tensor.detach().cpu()
    return state


def to_file_dict(hn: Hypernetwork) -> dict:
    """The dict the host's ``Hypernetwork.save`` would pickle for `hn`."""
    data: dict[Any, Any] = {size: (_module_state(k), _module_state(v)) for size, (k, v) in hn.layers.items()}
    arch = hn.arch
    data.update({
        "step": int(hn.step),
        "name": hn.name,
        "layer_structure": list(arch.layer_structure),
        "activation_func": arch.activation_func,
        "is_layer_norm": bool(arch.add_layer_norm),
        "weight_initialization": hn.weight_init,
        "sd_checkpoint": hn.sd_checkpoint,
        "sd_checkpoint_name": hn.sd_checkpoint_name,
        "activate_output": bool(arch.activate_output),
        "use_dropout": bool(hn.use_dropout),
        "dropout_structure": None if arch.dropout_structure is None else list(arch.dropout_structure),
        "last_layer_dropout": hn.last_layer_dropout,
        "optional_info": hn.optional_info or None,
    })
    return data


def _not_a_hypernetwork(data: Any) -> tuple[str, str | None]:
    """(what a file without hypernetwork modules looks like instead, where it belongs), so the user can move it."""
    if not isinstance(data, Mapping):
        return f"it holds a {type(data).__name__}, not the dict a hypernetwork file holds", None
    keys = [str(k) for k in data]
    if "string_to_param" in data or "emb_params" in data:
        return ("it is a textual-inversion embedding (it has 'string_to_param')",
                "move it to the embeddings folder")
    if any(k.startswith(("lora_", "lora.")) or ".lora_" in k or "lora_down" in k for k in keys):
        return "it is a LoRA (it has 'lora_*' keys)", "move it to the Lora folder"
    if "state_dict" in data or any(k.startswith("model.diffusion_model.") for k in keys):
        return "it is a model checkpoint", "move it to the Stable-diffusion folder"
    shown = ", ".join(keys[:6]) + (", ..." if len(keys) > 6 else "")
    return f"it has no per-width modules (integer keys); its keys are: {shown or 'none'}", None


def _architecture(data: Mapping) -> tuple[Architecture, bool]:
    """Architecture and use_dropout with the host's load defaults for missing keys."""
    layer_structure = data.get("layer_structure", [1, 2, 1])
    activation = data.get("activation_func", None)
    dropout = data.get("dropout_structure", None)
    if not isinstance(layer_structure, (list, tuple)):
        raise AlchemyError(f"'layer_structure' is {layer_structure!r}, not a list of numbers")
    if activation is not None and not isinstance(activation, str):
        raise AlchemyError(f"'activation_func' is {activation!r}, not a name")
    if dropout is not None and (not isinstance(dropout, (list, tuple)) or
                                any(not isinstance(p, (int, float)) for p in dropout)):
        raise AlchemyError(f"'dropout_structure' is {dropout!r}, not a list of numbers")
    use_dropout = True if dropout is not None and any(dropout) else bool(data.get("use_dropout", False))
    if dropout is None:
        dropout = parse_dropout_structure(layer_structure, use_dropout, bool(data.get("last_layer_dropout", False)))
    arch = Architecture(layer_structure=layer_structure, activation_func=activation,
                        add_layer_norm=bool(data.get("is_layer_norm", False)),
                        activate_output=bool(data.get("activate_output", True)), dropout_structure=dropout)
    arch.check()
    return arch, use_dropout


def declared_parameters(size: int, arch: Architecture) -> int:
    """How many numbers the Linear and LayerNorm layers `arch` describes for context width `size` hold,
    computed without building anything (a lower bound: an activation such as PReLU adds its own)."""
    ls = arch.layer_structure
    total = 0
    for i in range(len(ls) - 1):
        width_in, width_out = int(size * ls[i]), int(size * ls[i + 1])
        total += width_in * width_out + width_out + (2 * width_out if arch.add_layer_norm else 0)
    return total


def _load_module(size: int, arch: Architecture, state: Any, which: str) -> HypernetworkModule:
    if not isinstance(state, Mapping):
        raise AlchemyError(f"the {which} module for width {size} is a {type(state).__name__}, not a state dict")
    # The structure is untrusted: building modules for [1, 1e12, 1] would allocate before load_state_dict
    # could notice. The stored weights (already read, so bounded by the file's size) must hold every number.
    stored = sum(t.numel() for t in state.values() if isinstance(t, torch.Tensor))
    declared = declared_parameters(size, arch)
    if declared > stored:  # fewer is load_state_dict's to report (activations such as PReLU add a few more)
        raise AlchemyError(f"the {which} module for width {size} does not match the file's own structure: "
                           f"layer_structure {list(arch.layer_structure)} declares {declared} weights but the file "
                           f"stores {stored} (refused before allocating)")
    module = HypernetworkModule(size, arch, weight_init=None)
    try:
        module.load_state_dict(upgrade_state_dict(state))
    except (RuntimeError, TypeError) as exc:
        detail = str(exc).replace("\n", " ").replace("\t", "")
        raise AlchemyError(f"the {which} module for width {size} does not match the file's own structure "
                           f"(layer_structure {list(arch.layer_structure)}, activation {arch.activation_func!r}, "
                           f"layer norm {arch.add_layer_norm}): {detail}") from None
    return module


def from_file_dict(data: Any, default_name: str) -> Hypernetwork:
    """Build a Hypernetwork from the loaded dict, as the host's ``Hypernetwork.load`` does (eval mode)."""
    sizes = [k for k in data if type(k) is int] if isinstance(data, Mapping) else []
    if any(size < 1 for size in sizes):
        raise AlchemyError(f"context widths {sizes} must be positive")
    if not sizes:
        what, fix = _not_a_hypernetwork(data)
        raise AlchemyError(f"not a hypernetwork: {what}", fix=fix)
    arch, use_dropout = _architecture(data)
    layers = {}
    for size in sizes:
        pair = data[size]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise AlchemyError(f"width {size} should hold a (k, v) pair of state dicts, got {type(pair).__name__}")
        layers[size] = (_load_module(size, arch, pair[0], "k"), _load_module(size, arch, pair[1], "v"))
    name = data.get("name", default_name)
    step = data.get("step", 0)
    if not isinstance(step, int) or isinstance(step, bool):
        raise AlchemyError(f"'step' is {step!r}, not an integer")
    hn = Hypernetwork(
        name=name if is_valid_name(name) else default_name, arch=arch, layers=layers,  # untrusted name
        weight_init=data.get("weight_initialization", "Normal"), use_dropout=use_dropout,
        step=step, sd_checkpoint=data.get("sd_checkpoint"),
        sd_checkpoint_name=data.get("sd_checkpoint_name"), optional_info=data.get("optional_info"))
    hn.eval()
    return hn


# ---- files -------------------------------------------------------------------------------------------

def read_hypernetwork(path: str | os.PathLike) -> Hypernetwork:
    """Load a hypernetwork ``.pt`` safely (restricted unpickling); every problem is an AlchemyError naming it.

    The optimizer side file is not read here: see :func:`read_optimizer_state`.
    """
    path = Path(path)
    data = safe_load(path)
    fix = "this file is not a usable hypernetwork; remove it from the hypernetworks folder"
    try:
        hn = from_file_dict(data, default_name=path.stem)
    except AlchemyError as exc:
        raise AlchemyError(exc.what, path, exc.fix or fix) from None
    except Exception as exc:  # noqa: BLE001 — malformed beyond the checks above (odd types, tensors as flags...)
        raise AlchemyError(f"malformed hypernetwork ({type(exc).__name__}: {exc})", path, fix) from None
    hn.filename = str(path)
    return hn


def write_hypernetwork(hn: Hypernetwork, path: str | os.PathLike, *, save_optimizer_state: bool = False) -> None:
    """Write `hn` in the host's layout, loadable by a stock WebUI whatever torch runs here (atomic).

    With `save_optimizer_state` and an ``optimizer_state_dict`` on `hn`, also write ``<path>.optim``
    keyed to the new file's hash, as the host does with its "save optimizer state" setting.
    """
    from ..formats.torch_pt import save_pt  # the host-compatible zip writer

    path = Path(path)
    save_pt(to_file_dict(hn), path)
    hn.filename = str(path)
    if save_optimizer_state and hn.optimizer_state_dict:
        side: dict[str, Any] = {}
        if hn.optimizer_name is not None:
            side["optimizer_name"] = hn.optimizer_name
        side["hash"] = shorthash(path)
        side["optimizer_state_dict"] = hn.optimizer_state_dict
        save_pt(side, optimizer_path(path))


def optimizer_path(path: str | os.PathLike) -> Path:
    return Path(os.fspath(path) + OPTIM_SUFFIX)


def read_optimizer_state(path: str | os.PathLike) -> tuple[str, dict | None]:
    """(optimizer name, state dict or None) for resuming training of the hypernetwork at `path`.

    As in the host: the saved state (and its optimizer name) counts only when the side file's hash
    matches the ``.pt``; otherwise training starts a fresh "AdamW".
    """
    side_path = optimizer_path(path)
    if not side_path.is_file():
        return "AdamW", None
    side = safe_load(side_path)
    if not isinstance(side, Mapping):
        raise AlchemyError(f"optimizer side file holds a {type(side).__name__}, not a dict", side_path,
                           "delete it; training will start a fresh optimizer")
    state = side.get("optimizer_state_dict")
    if state and side.get("hash") == shorthash(path):
        return str(side.get("optimizer_name", "AdamW")), state
    return "AdamW", None
