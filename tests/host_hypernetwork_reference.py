"""An independent re-statement, for tests, of how a stock WebUI v1.10.1 reads, builds, runs and writes a
hypernetwork ``.pt`` (and its ``.pt.optim``).

Written from the documented host facts (shared/reference/a1111-host.md 3.4, 4.2, 5.5), deliberately NOT
using extensions_lib: a file is vetted with the host's safe-loader rules (:func:`host_pt_reference.host_check_pt`),
then ``torch.load``-ed and interpreted with the host's load defaults; modules are built with the host's
layer order and loaded with a strict ``load_state_dict``, as the host does.
"""
from __future__ import annotations

import hashlib
import inspect
import os

import torch
from torch import nn

from host_pt_reference import host_check_pt


def _host_activation_table() -> dict[str, type]:
    table = {"linear": nn.Identity, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU,
             "swish": nn.Hardswish, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}
    for cls_name, cls in inspect.getmembers(torch.nn.modules.activation):
        if inspect.isclass(cls) and cls.__module__ == "torch.nn.modules.activation":
            table[cls_name.lower()] = cls
    return table


HOST_ACTIVATIONS = _host_activation_table()


def host_parse_dropout_structure(layer_structure, use_dropout, last_layer_dropout):
    if not use_dropout:
        return [0] * len(layer_structure)
    return [0] + [0.3] * (len(layer_structure) - 3) + [0.3 if last_layer_dropout else 0] + [0]


class HostModule(nn.Module):
    """The host's HypernetworkModule: Sequential ``linear`` of Linear, [activation], [LayerNorm], [Dropout]."""

    def __init__(self, dim, state_dict=None, layer_structure=None, activation_func=None, weight_init="Normal",
                 add_layer_norm=False, activate_output=False, dropout_structure=None):
        super().__init__()
        self.multiplier = 1.0
        assert layer_structure[0] == 1 and layer_structure[-1] == 1
        parts = []
        last = len(layer_structure) - 2
        for i in range(len(layer_structure) - 1):
            parts.append(nn.Linear(int(dim * layer_structure[i]), int(dim * layer_structure[i + 1])))
            skip = activation_func in ("linear", None) or (i >= last and not activate_output)
            if not skip:
                if activation_func not in HOST_ACTIVATIONS:
                    raise RuntimeError(f"hypernetwork uses an unsupported activation function: {activation_func}")
                parts.append(HOST_ACTIVATIONS[activation_func]())
            if add_layer_norm:
                parts.append(nn.LayerNorm(int(dim * layer_structure[i + 1])))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                assert 0 < dropout_structure[i + 1] < 1
                parts.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*parts)
        if state_dict is not None:
            renames = {"linear1.bias": "linear.0.bias", "linear1.weight": "linear.0.weight",
                       "linear2.bias": "linear.1.bias", "linear2.weight": "linear.1.weight"}
            state_dict = {renames.get(k, k): v for k, v in state_dict.items()}
            self.load_state_dict(state_dict)  # strict, as in the host
        else:
            for layer in self.linear:
                if type(layer) not in (nn.Linear, nn.LayerNorm):
                    continue
                w, b = layer.weight.data, layer.bias.data
                if weight_init == "Normal" or type(layer) is nn.LayerNorm:
                    nn.init.normal_(w, mean=0.0, std=0.01)
                    nn.init.normal_(b, mean=0.0, std=0)
                elif weight_init == "XavierUniform":
                    nn.init.xavier_uniform_(w)
                    nn.init.zeros_(b)
                elif weight_init == "XavierNormal":
                    nn.init.xavier_normal_(w)
                    nn.init.zeros_(b)
                elif weight_init in ("KaimingUniform", "KaimingNormal"):
                    init = nn.init.kaiming_uniform_ if weight_init == "KaimingUniform" else nn.init.kaiming_normal_
                    init(w, nonlinearity="leaky_relu" if activation_func == "leakyrelu" else "relu")
                    nn.init.zeros_(b)
                else:
                    raise KeyError(f"Key {weight_init} is not defined as initialization!")

    def forward(self, x):
        return x + self.linear(x) * (self.multiplier if not self.training else 1)


class HostHypernetwork:
    """The host's Hypernetwork object (the fields and methods the tests use)."""

    def __init__(self, name=None, enable_sizes=None, layer_structure=None, activation_func=None, weight_init=None,
                 add_layer_norm=False, use_dropout=False, activate_output=False, **kwargs):
        self.filename, self.name, self.layers, self.step = None, name, {}, 0
        self.sd_checkpoint = self.sd_checkpoint_name = None
        self.layer_structure, self.activation_func, self.weight_init = layer_structure, activation_func, weight_init
        self.add_layer_norm, self.use_dropout, self.activate_output = add_layer_norm, use_dropout, activate_output
        self.last_layer_dropout = kwargs.get("last_layer_dropout", True)
        self.dropout_structure = kwargs.get("dropout_structure", None)
        if self.dropout_structure is None and layer_structure is not None:  # (load() fills it in later)
            self.dropout_structure = host_parse_dropout_structure(self.layer_structure, self.use_dropout,
                                                                  self.last_layer_dropout)
        self.optimizer_name = self.optimizer_state_dict = self.optional_info = None
        for size in enable_sizes or []:
            self.layers[size] = tuple(HostModule(size, None, self.layer_structure, self.activation_func,
                                                 self.weight_init, self.add_layer_norm, self.activate_output,
                                                 self.dropout_structure) for _ in range(2))
        self.eval()

    def weights(self):
        return [p for pair in self.layers.values() for module in pair for p in module.parameters()]

    def train(self, mode=True):
        for pair in self.layers.values():
            for module in pair:
                module.train(mode)
                for p in module.parameters():
                    p.requires_grad = mode

    def eval(self):
        self.train(False)

    def set_multiplier(self, multiplier):
        for pair in self.layers.values():
            for module in pair:
                module.multiplier = multiplier
        return self

    def save(self, filename, legacy_keys=()):
        """torch.save the host's dict; `legacy_keys` are left out (what older hosts did not write yet)."""
        data = {size: (pair[0].state_dict(), pair[1].state_dict()) for size, pair in self.layers.items()}
        data.update({
            "step": self.step, "name": self.name, "layer_structure": self.layer_structure,
            "activation_func": self.activation_func, "is_layer_norm": self.add_layer_norm,
            "weight_initialization": self.weight_init, "sd_checkpoint": self.sd_checkpoint,
            "sd_checkpoint_name": self.sd_checkpoint_name, "activate_output": self.activate_output,
            "use_dropout": self.use_dropout, "dropout_structure": self.dropout_structure,
            "last_layer_dropout": (self.dropout_structure[-2] != 0) if self.dropout_structure is not None
            else self.last_layer_dropout,
            "optional_info": self.optional_info if self.optional_info else None,
        })
        for key in legacy_keys:
            del data[key]
        torch.save(data, filename)


def host_shorthash(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()[:10]


def host_load_hypernetwork(path, vet: bool = True) -> HostHypernetwork:
    """What ``Hypernetwork().load(path)`` leaves, after the host's safe loader accepted the file.

    vet=False skips the safe-loader check, for files the tests' own torch wrote in the host's place (a
    newer torch adds zip entries the host's check refuses; a real host's torch 2.1 does not).
    """
    if vet:
        host_check_pt(path)
    data = torch.load(path, map_location="cpu", weights_only=False)  # vetted above, as the host does
    hn = HostHypernetwork()
    hn.filename = str(path)
    hn.name = os.path.splitext(os.path.basename(path))[0]
    hn.layer_structure = data.get("layer_structure", [1, 2, 1])
    hn.optional_info = data.get("optional_info", None)
    hn.activation_func = data.get("activation_func", None)
    hn.weight_init = data.get("weight_initialization", "Normal")
    hn.add_layer_norm = data.get("is_layer_norm", False)
    hn.dropout_structure = data.get("dropout_structure", None)
    hn.use_dropout = True if hn.dropout_structure is not None and any(hn.dropout_structure) \
        else data.get("use_dropout", False)
    hn.activate_output = data.get("activate_output", True)
    hn.last_layer_dropout = data.get("last_layer_dropout", False)
    if hn.dropout_structure is None:
        hn.dropout_structure = host_parse_dropout_structure(hn.layer_structure, hn.use_dropout, hn.last_layer_dropout)

    side_path = str(path) + ".optim"
    side = {}
    if os.path.exists(side_path):
        if vet:
            host_check_pt(side_path)
        side = torch.load(side_path, map_location="cpu", weights_only=False)
    hn.optimizer_state_dict = side.get("optimizer_state_dict") if host_shorthash(path) == side.get("hash") else None
    hn.optimizer_name = side.get("optimizer_name", "AdamW") if hn.optimizer_state_dict else "AdamW"

    for size, pair in data.items():
        if type(size) is int:
            hn.layers[size] = tuple(HostModule(size, sd, hn.layer_structure, hn.activation_func, hn.weight_init,
                                               hn.add_layer_norm, hn.activate_output, hn.dropout_structure)
                                    for sd in pair)
    hn.name = data.get("name", hn.name)
    hn.step = data.get("step", 0)
    hn.sd_checkpoint = data.get("sd_checkpoint", None)
    hn.sd_checkpoint_name = data.get("sd_checkpoint_name", None)
    hn.eval()
    return hn


def host_optimizer(hn: HostHypernetwork, lr: float = 1e-5) -> torch.optim.Optimizer:
    """The optimizer the host's train_hypernetwork builds for `hn` (its saved state loaded when present)."""
    hn.train()
    optimizer = getattr(torch.optim, hn.optimizer_name)(params=hn.weights(), lr=lr)
    if hn.optimizer_state_dict:
        optimizer.load_state_dict(hn.optimizer_state_dict)
    return optimizer
