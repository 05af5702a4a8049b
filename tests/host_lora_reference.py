"""An independent re-statement, for tests, of how the WebUI v1.10.1 built-in Lora extension
(``extensions-builtin/Lora``) finds, names, loads and applies a kohya LoRA file. Deliberately NOT using
extensions_lib. Checked against the v1.10.1 source (read for facts; function names exact, line numbers
approximate, ±30). v1.10.1 has no ``lora_convert.py`` (that file is SD.Next's): the name conversion lives in
``networks.py``.

- ``networks.py`` ``assign_network_names_to_compvis_modules`` (≈ l.122-147): every module of
  ``cond_stage_model.wrapped`` (or ``cond_stage_model`` itself when it has no ``.wrapped``) and of
  ``sd_model.model`` is named by its dotted path with '.' → '_' (``network_layer_mapping``); the names of
  both trees share one dict. -> :func:`names_of_model`, :func:`names_of_checkpoint`.
- ``networks.py`` ``convert_diffusers_name_to_compvis`` (≈ l.39-119, ``suffix_conversion`` ≈ l.43-53):
  the kohya → LDM name rules (conv_in/out, time embedding, down/mid/up attentions|resnets, samplers,
  ``lora_te_`` SD1 vs SD2 (``self_attn`` → ``attn``, ``mlp_fc1/2`` → ``mlp_c_fc/c_proj``), ``lora_te2_``).
  Captured digit groups become ints when they *start* with a digit (``re.match``). -> :func:`convert`.
- ``networks.py`` ``load_network`` (≈ l.158-265): ``is_sd2`` is whether ``"model_transformer_resblocks"``
  is a *key* of the mapping (the resblocks container of OpenCLIP); a file key is split at its first '.'
  into (network key, part); the converted key is looked up; if absent and it ends in ``_[qkv]_proj`` the
  module its prefix names is taken (SD2's ``MultiheadAttention``), the entry still keyed by the full
  converted name; then ``lora_unet`` → ``diffusion_model`` and ``lora_te1_text_model`` →
  ``0_transformer_text_model``/``transformer_text_model`` fallbacks; keys still unmatched are only logged
  (skipped). Each matched group must be accepted by some module type, else the *whole file* fails to load
  (``AssertionError: Could not find a module type``). -> :func:`load_network`.
- ``network_lora.py`` ``ModuleTypeLora.create_module``/``NetworkModuleLora`` (whole file, ≈ 90 lines):
  a LoRA group needs ``lora_up.weight`` and ``lora_down.weight`` (or ``lora_A``/``lora_B``); the target
  module's *exact* type must be ``Linear``, ``NonDynamicallyQuantizableLinear``, ``MultiheadAttention``
  (weights reshaped to 2-D) or ``Conv2d`` (down kept/reshaped to 4-D, up 1×1), else the file fails
  (``AssertionError: ... matched a layer with unsupported type``); ``dim`` = lora_down's first dimension;
  ``calc_updown``: ``up.reshape(out, -1) @ down.reshape(dim, -1)`` shaped ``[up.size(0), down.size(1)]``
  (+ down's kernel dims when 4-D). -> :func:`updown`.
- ``network.py`` ``NetworkModule`` (≈ l.95-140): ``alpha``/``scale`` parts are read with ``.item()``;
  ``calc_scale`` = ``scale`` if given, else ``alpha / dim`` if alpha given, else 1; ``multiplier()`` is
  the te multiplier when ``'transformer' in sd_key[:20]``, else the unet one; ``finalize_updown`` reshapes
  to the module weight's shape when the element counts agree. ``NetworkOnDisk`` (≈ l.20-75): ``alias`` =
  metadata ``ss_output_name`` or the file name; ``detect_version``: ``ss_base_model_version`` starting
  ``sdxl_`` → SDXL, ``ss_v2 == "True"`` → SD2, any other metadata → SD1, none → Unknown.
- ``networks.py`` ``network_apply_weights`` (≈ l.420-520): when a layer's forward runs, the entry under
  its own name changes ``weight`` (a shape that still does not fit raises, is caught and counted as an
  error: the layer stays unchanged); a ``MultiheadAttention`` takes ``<name>_q_proj``, ``_k_proj``,
  ``_v_proj`` *and* ``_out_proj`` together (q/k/v stacked onto ``in_proj_weight``, out onto
  ``out_proj.weight``) and nothing when one is missing. ``out_proj``'s own forward never runs (the
  attention reads its weight), so its entry acts only through the attention. -> :func:`weight_changes`.
- ``networks.py`` ``process_network_files``/``list_available_networks`` (≈ l.660-710): files ``*.pt``,
  ``*.ckpt``, ``*.safetensors`` anywhere under ``--lora-dir``, named by file stem.
- ``ui_extra_networks_lora.py`` ``create_item``: with an SD2 model loaded, cards of networks whose
  detected version is not SD2 are hidden (likewise SD1/SDXL) unless "show all". -> :func:`shown_for`.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import torch
from torch import nn

RE_DIGITS = re.compile(r"\d+")
RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")

SUFFIX_CONVERSION = {
    "attentions": {},
    "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"},
}


class HostRefuses(Exception):
    """The host fails to load the whole file (its loader raises; the network is not used)."""


def convert(key: str, is_sd2: bool) -> str:
    def match(regex):
        r = re.match(regex, key)
        if not r:
            return None
        return [int(x) if RE_DIGITS.match(x) else x for x in r.groups()]

    if (m := match(r"lora_unet_conv_in(.*)")) is not None:
        return f"diffusion_model_input_blocks_0_0{m[0]}"
    if (m := match(r"lora_unet_conv_out(.*)")) is not None:
        return f"diffusion_model_out_2{m[0]}"
    if (m := match(r"lora_unet_time_embedding_linear_(\d+)(.*)")) is not None:
        return f"diffusion_model_time_embed_{m[0] * 2 - 2}{m[1]}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_input_blocks_{1 + m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = SUFFIX_CONVERSION.get(m[0], {}).get(m[2], m[2])
        return f"diffusion_model_middle_block_{1 if m[0] == 'attentions' else m[1] * 2}_{suffix}"
    if (m := match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)")) is not None:
        suffix = SUFFIX_CONVERSION.get(m[1], {}).get(m[3], m[3])
        return f"diffusion_model_output_blocks_{m[0] * 3 + m[2]}_{1 if m[1] == 'attentions' else 0}_{suffix}"
    if (m := match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv")) is not None:
        return f"diffusion_model_input_blocks_{3 + m[0] * 3}_0_op"
    if (m := match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv")) is not None:
        return f"diffusion_model_output_blocks_{2 + m[0] * 3}_{2 if m[0] > 0 else 1}_conv"
    if (m := match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if is_sd2:
            if "mlp_fc1" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
            if "mlp_fc2" in m[1]:
                return f"model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
            return f"model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
        return f"transformer_text_model_encoder_layers_{m[0]}_{m[1]}"
    if (m := match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)")) is not None:
        if "mlp_fc1" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc1', 'mlp_c_fc')}"
        if "mlp_fc2" in m[1]:
            return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('mlp_fc2', 'mlp_c_proj')}"
        return f"1_model_transformer_resblocks_{m[0]}_{m[1].replace('self_attn', 'attn')}"
    return key


# --- the host's layer names --------------------------------------------------------------------------

@dataclass
class Layer:
    """What the loader needs of a named module: its kind by *exact* type and its weight shape."""

    kind: str  # "linear" | "conv" | "mha" | "other"
    shape: tuple = ()
    module: nn.Module | None = None


def _kind(module: nn.Module) -> str:
    if type(module) in (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return "linear"
    if type(module) is nn.MultiheadAttention:
        return "mha"
    if type(module) is nn.Conv2d:
        return "conv"
    return "other"


def names_of_model(cond_stage_model: nn.Module, model: nn.Module) -> dict[str, Layer]:
    """``network_layer_mapping`` of a live model: ``cond_stage_model`` is ``sd_model.cond_stage_model``,
    ``model`` is ``sd_model.model``."""
    out = {}
    wrapped = getattr(cond_stage_model, "wrapped", cond_stage_model)
    for root in (wrapped, model):
        for name, module in root.named_modules():
            weight = module.in_proj_weight if type(module) is nn.MultiheadAttention else getattr(module, "weight", None)
            out[name.replace(".", "_")] = Layer(_kind(module), tuple(weight.shape) if isinstance(weight, torch.Tensor) else (),
                                                module)
    return out


def names_of_checkpoint(ldm_keys, shapes: dict[str, tuple] | None = None) -> dict[str, Layer]:
    """The same names derived from an LDM checkpoint's keys (the module paths under ``model.`` and
    ``cond_stage_model.``, ancestors included); kinds from the weights (2-D Linear, 4-D Conv2d,
    ``in_proj_weight`` MultiheadAttention). `shapes`: {key: shape} when known."""
    out: dict[str, Layer] = {}
    for key in ldm_keys:
        for prefix in ("model.", "cond_stage_model."):
            if not key.startswith(prefix):
                continue
            path, _, param = key[len(prefix):].rpartition(".")
            segments = path.split(".")
            for i in range(1, len(segments)):
                out.setdefault("_".join(segments[:i]), Layer("other"))
            shape = tuple((shapes or {}).get(key, ()))
            if param == "in_proj_weight":
                out["_".join(segments)] = Layer("mha", shape)
            elif param == "weight":
                kind = "conv" if len(shape) == 4 else "linear" if len(shape) == 2 and "embedding" not in path else "other"
                current = out.get("_".join(segments))
                if current is None or current.kind == "other":
                    out["_".join(segments)] = Layer(kind, shape)
            else:
                out.setdefault("_".join(segments), Layer("other"))
    return out


# --- loading -----------------------------------------------------------------------------------------

@dataclass
class Entry:
    sd_key: str
    layer: Layer
    parts: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def up(self) -> torch.Tensor:
        return self.parts["lora_up.weight"] if "lora_up.weight" in self.parts else self.parts["lora_B.weight"]

    @property
    def down(self) -> torch.Tensor:
        return self.parts["lora_down.weight"] if "lora_down.weight" in self.parts else self.parts["lora_A.weight"]

    def scale(self) -> float:
        if "scale" in self.parts:
            return float(self.parts["scale"].item())
        if "alpha" in self.parts:
            return float(self.parts["alpha"].item()) / self.down.shape[0]
        return 1.0

    def multiplier(self, te: float, unet: float) -> float:
        return te if "transformer" in self.sd_key[:20] else unet


def load_network(tensors: dict[str, torch.Tensor], names: dict[str, Layer]) -> tuple[dict[str, Entry], dict[str, str]]:
    """({converted key: entry}, {file key: converted key it failed to match}). Raises HostRefuses when the
    host's loader would raise for the file."""
    is_sd2 = "model_transformer_resblocks" in names
    matched: dict[str, Entry] = {}
    failed: dict[str, str] = {}
    for key_network, weight in tensors.items():
        network_key, _, part = key_network.partition(".")
        key = convert(network_key, is_sd2)
        layer = names.get(key)
        if layer is None and (m := RE_X_PROJ.match(key)):
            layer = names.get(m.group(1))
        if layer is None and "lora_unet" in network_key:
            key = network_key.replace("lora_unet", "diffusion_model")
            layer = names.get(key)
        elif layer is None and "lora_te1_text_model" in network_key:
            key = network_key.replace("lora_te1_text_model", "0_transformer_text_model")
            layer = names.get(key)
            if layer is None:
                key = network_key.replace("lora_te1_text_model", "transformer_text_model")
                layer = names.get(key)
        if layer is None:
            failed[key_network] = key
            continue
        matched.setdefault(key, Entry(key, layer)).parts[part] = weight
    for key, entry in matched.items():
        has = set(entry.parts)
        if not ({"lora_up.weight", "lora_down.weight"} <= has or {"lora_A.weight", "lora_B.weight"} <= has):
            raise HostRefuses(f"no module type accepts {key}: {sorted(has)}")
        if entry.layer.kind not in ("linear", "conv", "mha"):
            raise HostRefuses(f"{key} matched a layer with unsupported type ({entry.layer.kind})")
    return matched, failed


def updown(entry: Entry, target_shape: tuple, te: float = 1.0, unet: float = 1.0) -> torch.Tensor:
    """The weight change (float64) the host adds to a weight of `target_shape`."""
    up, down = entry.up.double(), entry.down.double()
    if entry.layer.kind == "conv":
        if down.ndim == 2:
            down = down.reshape(down.shape[0], -1, 1, 1)
        output_shape = [up.shape[0], down.shape[1], *down.shape[2:]]
    else:
        down = down.reshape(down.shape[0], -1)
        output_shape = [up.shape[0], down.shape[1]]
    delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(output_shape)
    if delta.numel() == torch.Size(target_shape).numel():
        delta = delta.reshape(target_shape)
    return delta * entry.scale() * entry.multiplier(te, unet)


def weight_changes(matched: dict[str, Entry], names: dict[str, Layer], te: float = 1.0,
                   unet: float = 1.0) -> tuple[dict[tuple[str, str], torch.Tensor], list[str]]:
    """({(layer name, "weight" | "in_proj_weight" | "out_proj.weight"): change}, layer names whose change
    did not fit (the host counts an error and leaves them)) as ``network_apply_weights`` makes them."""
    changes, errors = {}, []
    mha_names = {n for n, layer in names.items() if layer.kind == "mha"}
    for name, layer in names.items():
        if layer.kind == "mha":
            q, k, v, out = (matched.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
            if q is None or k is None or v is None or out is None:
                continue
            width = layer.shape[1]
            stacked = torch.cat([updown(e, (width, width), te, unet) for e in (q, k, v)])
            changes[(name, "in_proj_weight")] = stacked
            changes[(name, "out_proj.weight")] = updown(out, (width, width), te, unet)
            continue
        entry = matched.get(name)
        if entry is None or any(name == f"{m}_out_proj" for m in mha_names):
            continue  # out_proj of an attention: its own forward never runs
        delta = updown(entry, layer.shape, te, unet)
        if tuple(delta.shape) != tuple(layer.shape):
            errors.append(name)
            continue
        changes[(name, "weight")] = delta
    return changes, errors


def merged_state_dict(state_dict: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                      multiplier: float) -> dict[str, torch.Tensor]:
    """An LDM checkpoint's weights with the file applied at `multiplier` (``<lora:name:multiplier>``)."""
    names = names_of_checkpoint(state_dict.keys(), {k: tuple(v.shape) for k, v in state_dict.items()})
    matched, failed = load_network(tensors, names)
    assert not failed, f"the host would not match {list(failed)[:5]}"
    changes, errors = weight_changes(matched, names, multiplier, multiplier)
    assert not errors, f"the host could not apply {errors[:5]}"
    by_path = {}
    for key in state_dict:
        for prefix in ("model.", "cond_stage_model."):
            if key.startswith(prefix):
                path, _, param = key[len(prefix):].rpartition(".")
                by_path[(path.replace(".", "_"), param)] = key
    out = dict(state_dict)
    for (name, param), delta in changes.items():
        key = by_path[(name, param)] if param != "out_proj.weight" else by_path[(f"{name}_out_proj", "weight")]
        out[key] = (out[key].double() + delta).to(out[key].dtype)
    return out


def apply_to_model(cond_stage_model: nn.Module, model: nn.Module, tensors: dict[str, torch.Tensor],
                   multiplier: float):
    """Apply the file to a live host model's weights in place (what the host does before a generation
    with ``<lora:name:multiplier>``); returns the entries matched and the keys failed. Undo by reloading."""
    names = names_of_model(cond_stage_model, model)
    matched, failed = load_network(tensors, names)
    changes, errors = weight_changes(matched, names, multiplier, multiplier)
    assert not errors, f"the host could not apply {errors[:5]}"
    with torch.no_grad():
        for (name, param), delta in changes.items():
            module = names[name].module
            target = module.out_proj.weight if param == "out_proj.weight" else getattr(module, param)
            target.copy_((target.double() + delta).to(target.dtype))
    return matched, failed


# --- listing -----------------------------------------------------------------------------------------

def detect_version(metadata: dict[str, str]) -> str:
    if str(metadata.get("ss_base_model_version", "")).startswith("sdxl_"):
        return "SDXL"
    if str(metadata.get("ss_v2", "")) == "True":
        return "SD2"
    return "SD1" if metadata else "Unknown"


def read_metadata(path) -> dict:
    """``sd_models.read_metadata_from_safetensors``: the header's ``__metadata__``, values that look like
    JSON objects decoded."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    out = {}
    for k, v in header.get("__metadata__", {}).items():
        out[k] = v
        if isinstance(v, str) and v[:1] == "{":
            try:
                out[k] = json.loads(v)
            except ValueError:
                pass
    return out


def shown_for(metadata: dict[str, str], model_family: str) -> bool:
    """Whether the Lora page shows the network's card with a `model_family` ("sd1"/"sd2"/"sdxl") model
    loaded (default settings: not "show all", no hidden unknowns)."""
    version = detect_version(metadata)
    return version == "Unknown" or version == model_family.upper()
