"""Stand-in for the built-in Lora extension's ``networks`` module (``extensions-builtin/Lora/networks.py``,
v1.10.1): the list of LoRA files under ``--lora-dir`` that ``<lora:NAME:W>`` and the Lora page use,
rescanned by ``list_available_networks()``. Loading and applying files is restated in
``tests/host_lora_reference.py``."""
from __future__ import annotations

import os

from modules import shared

available_networks = {}
available_network_aliases = {}
forbidden_network_aliases = {}
list_calls = 0


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
