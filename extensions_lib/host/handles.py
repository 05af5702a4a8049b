"""The host modules the glue found, and what the host therefore supports.

The glue imports each ``modules.*`` module it wants separately; a module that is missing (an older or
newer WebUI, Forge) is recorded with its import error instead of failing. Every feature that needs one
asks :meth:`HostHandles.unsupported`, and the tabs show the reason in place of their controls.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

HOST_MODULES = ("shared", "script_callbacks", "scripts", "call_queue", "sd_hijack", "sd_models", "devices",
                "extra_networks")
"""``modules.<name>`` the glue tries to import, each on its own."""


@dataclass
class HostHandles:
    """What the glue found; missing modules are None, with the reason in ``missing``."""

    extension_root: Path
    shared: Any = None
    script_callbacks: Any = None
    scripts: Any = None
    call_queue: Any = None
    sd_hijack: Any = None
    sd_models: Any = None
    devices: Any = None
    extra_networks: Any = None
    missing: dict[str, str] = field(default_factory=dict)
    missing_callbacks: list[str] = field(default_factory=list)

    # --- the model, without ever loading one -------------------------------------------------------
    def current_model(self) -> Any:
        """The loaded model object, or None. Reads ``sd_models.model_data.sd_model``: ``shared.sd_model``
        would start loading a checkpoint when none is loaded."""
        data = getattr(self.sd_models, "model_data", None)
        if data is not None:
            return getattr(data, "sd_model", None)
        # Hosts before 1.2 kept a plain module attribute (no loading property): reading it is safe.
        return vars(self.shared).get("sd_model") if self.shared is not None else None

    def model_loaded(self) -> bool:
        return self.current_model() is not None

    def device(self) -> torch.device:
        device = getattr(self.devices, "device", None)
        return torch.device(device) if device is not None else torch.device("cpu")

    # --- folders and hosts' lists --------------------------------------------------------------------
    @property
    def cmd_opts(self) -> Any:
        return getattr(self.shared, "cmd_opts", None)

    def data_path(self) -> Path:
        value = getattr(self.shared, "data_path", None) or getattr(self.cmd_opts, "data_dir", None)
        return Path(value) if value else Path(os.getcwd())

    def models_path(self) -> Path:
        value = getattr(self.shared, "models_path", None) or getattr(self.cmd_opts, "models_dir", None)
        return Path(value) if value else self.data_path() / "models"

    def embeddings_dir(self) -> Path:
        value = getattr(self.cmd_opts, "embeddings_dir", None)
        return Path(value) if value else self.data_path() / "embeddings"

    def hypernetwork_dir(self) -> Path:
        value = getattr(self.cmd_opts, "hypernetwork_dir", None)
        return Path(value) if value else self.models_path() / "hypernetworks"

    def templates_dir(self) -> Path | None:
        value = getattr(self.cmd_opts, "textual_inversion_templates_dir", None)
        return Path(value) if value else None

    @property
    def embedding_db(self) -> Any:
        hijack = getattr(self.sd_hijack, "model_hijack", None)
        return getattr(hijack, "embedding_db", None)

    def has_hypernetwork_path(self) -> bool:
        """Whether the host applies hypernetworks itself (``shared.loaded_hypernetworks`` filled by its
        ``hypernet`` extra network)."""
        if self.shared is None or not isinstance(getattr(self.shared, "loaded_hypernetworks", None), list):
            return False
        registry = getattr(self.extra_networks, "extra_network_registry", None)
        return isinstance(registry, dict) and "hypernet" in registry

    # --- what works here -----------------------------------------------------------------------------
    def unsupported(self) -> dict[str, str]:
        """Tab key -> why that tab cannot work in this WebUI (absent: it works)."""
        from ..methods.registry import methods

        out: dict[str, str] = {}
        needs_model = [panel for m in methods() for panel in m.model_panels()]
        if self.shared is None or self.sd_models is None:
            reason = "this WebUI does not expose its loaded model (modules.shared / modules.sd_models " \
                     f"missing: {self.missing.get('sd_models') or self.missing.get('shared')})"
            out.update({key: reason for key in needs_model})
        if getattr(self.cmd_opts, "lowvram", False):
            reason = "training does not work with --lowvram (the WebUI's own training refuses it too); " \
                     "restart the WebUI with --medvram instead"
            out.update({m.train_panel: reason for m in methods()})
        if self.call_queue is None or not hasattr(self.call_queue, "wrap_gradio_gpu_call"):
            reason = "this WebUI has no GPU queue (modules.call_queue.wrap_gradio_gpu_call), so training " \
                     "could run at the same time as a generation"
            for key in needs_model:
                out.setdefault(key, reason)
        return out

    def summary(self) -> str:
        """One line for the console: what is missing and what that turns off."""
        parts = [f"modules.{name} ({why})" for name, why in self.missing.items()]
        parts += [f"script_callbacks.{name}" for name in self.missing_callbacks]
        return "missing " + ", ".join(parts) if parts else "all host features found"
