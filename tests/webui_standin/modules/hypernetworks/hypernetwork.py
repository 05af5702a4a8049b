"""Stand-in for ``modules/hypernetworks/hypernetwork.py``: listing, loading into ``shared.loaded_hypernetworks``
and ``apply_hypernetworks`` (what every attention forward calls). Files are read with
``extensions_lib.hypernetworks.file.read_hypernetwork`` (a test double for the host's reader of the same
format); the list/load/apply logic follows the host."""
from __future__ import annotations

import glob
import os

from modules import devices, shared


class _HostModule:
    """A host ``HypernetworkModule``: ``forward(x)`` uses the multiplier its Hypernetwork set."""

    def __init__(self, module):
        self.module = module

    def __call__(self, x):
        return self.module(x)


class Hypernetwork:
    filename = None
    name = None

    def __init__(self, loaded):
        self.loaded = loaded
        self.name = loaded.name
        self.filename = loaded.filename
        self.layers = {size: (_HostModule(k), _HostModule(v)) for size, (k, v) in loaded.layers.items()}
        self.step = loaded.step

    def set_multiplier(self, multiplier):
        self.loaded.set_multiplier(multiplier)
        return self

    def eval(self):
        self.loaded.eval()


def list_hypernetworks(path):
    res = {}
    for filename in sorted(glob.iglob(os.path.join(path, '**/*.pt'), recursive=True), key=str.lower):
        name = os.path.splitext(os.path.basename(filename))[0]
        if name != "None":
            res[name] = filename
    return res


def load_hypernetwork(name):
    from extensions_lib.hypernetworks.file import read_hypernetwork

    path = shared.hypernetworks.get(name, None)
    if path is None:
        return None
    loaded = read_hypernetwork(path)
    loaded.name = name
    loaded.eval()
    return Hypernetwork(loaded)


def load_hypernetworks(names, multipliers=None):
    already_loaded = {}
    for hypernetwork in shared.loaded_hypernetworks:
        if hypernetwork.name in names:
            already_loaded[hypernetwork.name] = hypernetwork
    shared.loaded_hypernetworks.clear()
    for i, name in enumerate(names):
        hypernetwork = already_loaded.get(name, None)
        if hypernetwork is None:
            hypernetwork = load_hypernetwork(name)
        if hypernetwork is None:
            continue
        hypernetwork.set_multiplier(multipliers[i] if multipliers else 1.0)
        shared.loaded_hypernetworks.append(hypernetwork)


def apply_single_hypernetwork(hypernetwork, context_k, context_v, layer=None):
    hypernetwork_layers = (hypernetwork.layers if hypernetwork is not None else {}).get(context_k.shape[2], None)
    if hypernetwork_layers is None:
        return context_k, context_v
    if layer is not None:
        layer.hyper_k = hypernetwork_layers[0]
        layer.hyper_v = hypernetwork_layers[1]
    context_k = devices.cond_cast_unet(hypernetwork_layers[0](devices.cond_cast_float(context_k)))
    context_v = devices.cond_cast_unet(hypernetwork_layers[1](devices.cond_cast_float(context_v)))
    return context_k, context_v


def apply_hypernetworks(hypernetworks, context, layer=None):
    context_k = context
    context_v = context
    for hypernetwork in hypernetworks:
        context_k, context_v = apply_single_hypernetwork(hypernetwork, context_k, context_v, layer)
    return context_k, context_v
