"""The WebUI Lora extension's merged networks, undone for training.

The built-in Lora extension (v1.10.1, ``extensions-builtin/Lora/networks.py``) applies ``<lora:name:w>`` by
adding each network's change into a layer's own weights the next time that layer runs, keeping what it found
there in CPU copies on the layer (``network_weights_backup``: the weight, or ``(in_proj_weight,
out_proj.weight)`` of a ``MultiheadAttention``; ``network_bias_backup``: the bias or ``out_proj.bias``, None
when there was none) and the set it applied in ``network_current_names``. At every later run of the layer
it compares that set with the networks of the last prompt (which stay loaded until the next generation):
when they differ it first copies the backup back, then applies the new set. Only layers carrying a
``network_layer_name`` take part.

So after a generation with a LoRA the model holds the merged weights. Training from there would train
LoRA-merged weights, and the layers would re-merge during the steps (the networks are still loaded); trained
weights that are kept would later be overwritten by the stale backup when the prompt's networks change.
:func:`own_weights` gives training the checkpoint's own weights and leaves the extension's record empty,
which the extension itself reads as "nothing applied, no backup yet" (as after it loads weights into a
layer): the next generation backs up the weights then present and applies its networks to those.
Nothing here imports the extension: without it the attributes are absent and this does nothing.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

LAYER_NAME = "network_layer_name"
WEIGHTS_BACKUP = "network_weights_backup"
BIAS_BACKUP = "network_bias_backup"
CURRENT_NAMES = "network_current_names"


def _put_back(owner: nn.Module, field: str, saved) -> None:
    # The extension's rule: a missing bias backup means the layer had no bias (one a network added goes).
    if saved is None:
        setattr(owner, field, None)
    else:
        getattr(owner, field).copy_(saved)


def restore_from_backup(module: nn.Module) -> bool:
    """Copy the extension's backup back into `module`, as the extension does before applying another set of
    networks; False when the module has none."""
    weights = getattr(module, WEIGHTS_BACKUP, None)
    bias = getattr(module, BIAS_BACKUP, None)
    if weights is None and bias is None:
        return False
    attention = isinstance(module, nn.MultiheadAttention)
    with torch.no_grad():
        if weights is not None:
            if attention:
                _put_back(module, "in_proj_weight", weights[0])
                _put_back(module.out_proj, "weight", weights[1])
            else:
                _put_back(module, "weight", weights)
        if attention:
            _put_back(module.out_proj, "bias", bias)
        else:
            _put_back(module, "bias", bias)
    return True


def forget_networks(module: nn.Module) -> None:
    """Empty the extension's record of `module` (nothing applied, no backup): it backs up the weights it then
    finds before it next applies a network."""
    setattr(module, CURRENT_NAMES, ())
    setattr(module, WEIGHTS_BACKUP, None)
    setattr(module, BIAS_BACKUP, None)


def unmerge(root: nn.Module) -> int:
    """Put every layer under `root` that the extension changed back to its own weights and empty its record;
    returns how many layers were put back."""
    count = 0
    for module in root.modules():
        if not any(hasattr(module, a) for a in (WEIGHTS_BACKUP, BIAS_BACKUP, CURRENT_NAMES)):
            continue
        count += restore_from_backup(module)
        forget_networks(module)
    return count


@contextlib.contextmanager
def own_weights(root: nn.Module) -> Iterator[int]:
    """Inside the block `root` has its own weights (the extension's merges undone) and the extension leaves
    its layers alone (their ``network_layer_name`` hidden: the loaded networks would re-merge at the first
    training step otherwise). Afterwards the names are back and the record is empty, so the next generation
    applies its networks to the weights the layers then hold (trained ones when kept). Yields how many
    layers were put back."""
    count = unmerge(root)
    named = [(m, getattr(m, LAYER_NAME)) for m in root.modules() if getattr(m, LAYER_NAME, None) is not None]
    for module, _ in named:
        setattr(module, LAYER_NAME, None)  # the extension skips a layer whose name is None
    try:
        yield count
    finally:
        for module, name in named:
            setattr(module, LAYER_NAME, name)
            if getattr(module, CURRENT_NAMES, ()) != () or getattr(module, WEIGHTS_BACKUP, None) is not None:
                forget_networks(module)
