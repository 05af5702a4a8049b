"""Stand-in for the built-in Lora extension's ``networks`` module (``extensions-builtin/Lora/networks.py``,
v1.10.1): the list of LoRA files under ``--lora-dir`` that ``<lora:NAME:W>`` and the Lora page use,
rescanned by ``list_available_networks()``, and how it applies ``<lora:NAME:W>``: ``load_networks`` (what
the prompt's extra-network activation calls) names the model's layers (``network_layer_name``) and keeps the
prompt's networks in ``loaded_networks`` until the next prompt; each named Linear/Conv2d/MultiheadAttention
then runs ``network_apply_weights`` when it runs (the real extension patches those classes' ``forward``; a
forward-pre-hook per layer does the same here without touching torch for other tests). That merges the
networks into the layer's weights, keeping CPU backups and the applied set on the layer, and restores the
backup first whenever the wanted set differs (``network_restore_weights_from_backup``). Reading files and the
weight changes are restated in ``tests/host_lora_reference.py``."""
from __future__ import annotations

import os

import torch

from modules import shared

available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
list_calls = 0
loaded_networks = []
errors = {}


class NetworkOnDisk:
    def __init__(self, name, filename):
        from host_lora_reference import detect_version, read_metadata

        self.name = name
        self.filename = filename
        self.metadata = read_metadata(filename) if filename.lower().endswith(".safetensors") else {}
        self.alias = self.metadata.get("ss_output_name", self.name)
        self.sd_version = detect_version(self.metadata)


def list_available_networks():
    global list_calls
    list_calls += 1
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "Addams": 1})
    os.makedirs(shared.cmd_opts.lora_dir, exist_ok=True)
    for root, _dirs, files in os.walk(shared.cmd_opts.lora_dir):
        for file in sorted(files):
            if os.path.splitext(file)[1].lower() not in (".pt", ".ckpt", ".safetensors"):
                continue
            name = os.path.splitext(file)[0]
            entry = NetworkOnDisk(name, os.path.join(root, file))
            available_networks[name] = entry
            if entry.alias in available_network_aliases:
                forbidden_network_aliases[entry.alias.lower()] = 1
            available_network_aliases[name] = entry
            available_network_aliases[entry.alias] = entry


class LoadedNetwork:
    def __init__(self, name, entries, multiplier):
        self.name = name
        self.modules = entries  # {converted key: host_lora_reference.Entry}
        self.te_multiplier = self.unet_multiplier = multiplier
        self.dyn_dim = None


def assign_network_names_to_compvis_modules(sd_model):
    from host_lora_reference import names_of_model

    if hasattr(sd_model, "network_layer_mapping"):
        return
    mapping = names_of_model(sd_model.cond_stage_model, sd_model.model)
    for name, layer in mapping.items():
        layer.module.network_layer_name = name
        if isinstance(layer.module, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.MultiheadAttention)):
            layer.module.register_forward_pre_hook(lambda module, args: network_apply_weights(module))
    sd_model.network_layer_mapping = mapping


def load_networks(sd_model, names, multipliers):
    """The prompt's ``<lora:name:m>`` list becomes ``loaded_networks`` (an empty list unloads them all)."""
    from safetensors.torch import load_file

    from host_lora_reference import load_network

    assign_network_names_to_compvis_modules(sd_model)
    loaded_networks.clear()
    for name, multiplier in zip(names, multipliers):
        entries, _failed = load_network(load_file(available_networks[name].filename), sd_model.network_layer_mapping)
        loaded_networks.append(LoadedNetwork(name, entries, multiplier))


def _backup(t):
    return None if t is None else t.to("cpu", copy=True)


def _put_back(owner, field, saved):
    if saved is None:
        setattr(owner, field, None)
    else:
        getattr(owner, field).copy_(saved)


def network_restore_weights_from_backup(self):
    weights = getattr(self, "network_weights_backup", None)
    bias = getattr(self, "network_bias_backup", None)
    if weights is None and bias is None:
        return
    mha = isinstance(self, torch.nn.MultiheadAttention)
    if weights is not None:
        if mha:
            _put_back(self, "in_proj_weight", weights[0])
            _put_back(self.out_proj, "weight", weights[1])
        else:
            _put_back(self, "weight", weights)
    _put_back(self.out_proj if mha else self, "bias", bias)


def network_apply_weights(self):
    from host_lora_reference import updown

    layer_name = getattr(self, "network_layer_name", None)
    if layer_name is None:
        return
    mha = isinstance(self, torch.nn.MultiheadAttention)
    current = getattr(self, "network_current_names", ())
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded_networks)
    with torch.no_grad():
        if getattr(self, "network_weights_backup", None) is None and wanted != ():
            if current != ():
                raise RuntimeError(f"{layer_name} - no backup weights found and current weights are not unchanged")
            self.network_weights_backup = (_backup(self.in_proj_weight), _backup(self.out_proj.weight)) if mha \
                else _backup(self.weight)
        if getattr(self, "network_bias_backup", None) is None and wanted != ():
            bias = self.out_proj.bias if mha else getattr(self, "bias", None)
            if bias is not None and current != ():
                raise RuntimeError("no backup bias found and current bias are not unchanged")
            self.network_bias_backup = _backup(bias)
        if current == wanted:
            return
        network_restore_weights_from_backup(self)
        for net in loaded_networks:
            entry = net.modules.get(layer_name)
            if entry is not None and not mha:
                delta = updown(entry, tuple(self.weight.shape), net.te_multiplier, net.unet_multiplier)
                if delta.shape != self.weight.shape:
                    errors[net.name] = errors.get(net.name, 0) + 1
                    continue
                self.weight.copy_((self.weight.double() + delta).to(self.weight.dtype))
                continue
            parts = [net.modules.get(f"{layer_name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            if mha and all(p is not None for p in parts):
                width = self.in_proj_weight.shape[1]
                qkv = torch.cat([updown(p, (width, width), net.te_multiplier, net.unet_multiplier) for p in parts[:3]])
                out = updown(parts[3], (width, width), net.te_multiplier, net.unet_multiplier)
                self.in_proj_weight.copy_((self.in_proj_weight.double() + qkv).to(self.in_proj_weight.dtype))
                self.out_proj.weight.copy_((self.out_proj.weight.double() + out).to(self.out_proj.weight.dtype))
        self.network_current_names = wanted
