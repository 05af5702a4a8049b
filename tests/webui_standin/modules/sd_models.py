"""Stand-in for ``modules/sd_models.py``: loading a checkpoint into ``shared.sd_model`` the host's way.

``load_model`` = build -> ``lowvram.apply`` -> hijack -> forced embedding reload -> ``model_loaded``
callbacks. ``reload_model_weights`` swaps weights inside the same object (undo hijack, load, hijack again,
callbacks). ``switch_to_cached`` is the RAM-cache switch (``sd_checkpoints_limit > 1``): the other model
object becomes current and **no callback fires**.
"""
from __future__ import annotations

import os

from modules import lowvram, script_callbacks, sd_hijack, shared

model_path = os.path.abspath(os.path.join(shared.models_path, "Stable-diffusion"))
checkpoints_list = {}
"""title -> CheckpointInfo, filled by :func:`list_models` (the checkpoint dropdown's choices)."""
checkpoint_aliases = {}


class SdModelData:
    def __init__(self):
        self.sd_model = None
        self.loaded_sd_models = []
        self.was_loaded_at_least_once = False

    def get_sd_model(self):
        if self.sd_model is None and not self.was_loaded_at_least_once:
            raise RuntimeError("stand-in: no checkpoint configured; call sd_models.load_model(path) first")
        return self.sd_model

    def set_sd_model(self, v, already_loaded=False):
        self.sd_model = v
        if v is not None and v not in self.loaded_sd_models:
            self.loaded_sd_models.insert(0, v)


model_data = SdModelData()


def select_checkpoint():
    m = model_data.sd_model
    return None if m is None else m.sd_checkpoint_info


def load_model(checkpoint, *, cached=True):
    """Build the LDM-shaped model of `checkpoint` (a path) and make it ``shared.sd_model``. cached=False
    builds it straight from the file, without the per-file cache and its copy (full-size benchmarks)."""
    from webui_standin.ldm_standin import build_ldm

    sd_model = build_ldm(checkpoint, cached=cached)
    lowvram.apply(sd_model)
    sd_hijack.model_hijack.hijack(sd_model)
    model_data.set_sd_model(sd_model)
    model_data.was_loaded_at_least_once = True
    sd_hijack.model_hijack.embedding_db.load_textual_inversion_embeddings(force_reload=True)
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


def reload_model_weights(checkpoint):
    """Same config: load `checkpoint`'s weights into the current model object, then the callbacks."""
    from webui_standin.ldm_standin import build_ldm

    sd_model = model_data.sd_model
    fresh = build_ldm(checkpoint)
    sd_hijack.model_hijack.undo_hijack(sd_model)
    sd_model.load_state_dict(fresh.state_dict())
    for name in ("sd_checkpoint_info", "sd_model_checkpoint", "sd_model_hash"):
        setattr(sd_model, name, getattr(fresh, name))
    sd_hijack.model_hijack.hijack(sd_model)
    script_callbacks.model_loaded_callback(sd_model)
    return sd_model


def switch_to_cached(sd_model):
    """Make an already loaded model current without any callback (the RAM-cache path)."""
    model_data.set_sd_model(sd_model)
    return sd_model


def unload_model_weights():
    model_data.sd_model = None


def list_models():
    """v1.10.1: clear the lists, then register every ``.ckpt``/``.safetensors`` under ``model_path`` and
    ``--ckpt-dir`` (``modelloader.load_models``: walked recursively, ``.vae.*`` files left out)."""
    from webui_standin.ldm_standin import CheckpointInfo

    checkpoints_list.clear()
    checkpoint_aliases.clear()
    found = []
    for folder in (model_path, shared.cmd_opts.ckpt_dir):
        if not folder or not os.path.isdir(folder):
            continue
        for root, _dirs, files in os.walk(folder, followlinks=True):
            for name in files:
                if name.endswith((".ckpt", ".safetensors")) and not name.endswith((".vae.ckpt", ".vae.safetensors")):
                    path = os.path.abspath(os.path.join(root, name))
                    if path not in found:
                        found.append(path)
    for filename in sorted(found, key=str.lower):
        info = CheckpointInfo(filename)
        checkpoints_list[info.title] = info
        for alias in (info.name, info.model_name, info.title, info.short_title, info.hash, info.shorthash):
            checkpoint_aliases[alias] = info
