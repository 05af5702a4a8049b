"""An independent re-statement, for tests, of how the WebUI v1.10.1 built-in Lora extension
(``extensions-builtin/Lora``: ``networks.load_network``, ``networks.convert_diffusers_name_to_compvis``,
``network_lora``) maps a kohya LoRA file onto the LDM model and what weight change it makes.

Deliberately NOT using extensions_lib. The host names every module of ``sd_model.model`` (the
``diffusion_model`` wrapper) and of ``cond_stage_model.wrapped`` by its dotted path with '.' -> '_'
(``network_layer_mapping``); here those names are derived from an LDM checkpoint's keys, which are the
same paths. A file key is split at its first '.' into (network key, part: ``lora_down.weight``,
``lora_up.weight``, ``alpha``); the network key is converted by the rules below; an SD2 text-encoder
``..._q_proj``/``_k_proj``/``_v_proj`` that names no module goes to the ``MultiheadAttention`` its prefix
names (``re_x_proj``), whose ``in_proj_weight`` holds q, k, v stacked. The weight change is
``up @ down * multiplier * alpha / rank`` (rank = lora_down's first dimension; alpha defaults to rank).
"""
from __future__ import annotations

import re

import torch

RE_DIGITS = re.compile(r"\d+")
RE_X_PROJ = re.compile(r"(.*)_([qkv]_proj)$")

SUFFIX_CONVERSION = {
    "attentions": {},
    "resnets": {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"},
}


def convert_diffusers_name_to_compvis(key: str, is_sd2: bool) -> str:
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
    return key


def layer_mapping(ldm_keys) -> dict[str, str]:
    """{network layer name: the LDM weight key of that module} as the host's ``network_layer_mapping``
    names modules (``sd_model.model`` -> ``diffusion_model...``, ``cond_stage_model.wrapped`` -> the rest)."""
    out = {}
    for key in ldm_keys:
        for prefix in ("model.", "cond_stage_model."):
            if key.startswith(prefix) and not key.startswith("model_ema"):
                path = key[len(prefix):]
                if path.endswith(".weight"):
                    out[path[:-len(".weight")].replace(".", "_")] = key
                elif path.endswith(".in_proj_weight"):  # MultiheadAttention: named by the module itself
                    out[path[:-len(".in_proj_weight")].replace(".", "_")] = key
    return out


def load_network(tensors: dict[str, torch.Tensor], ldm_keys) -> tuple[dict[str, dict], list[str]]:
    """({matched LDM weight key: {"parts": {part: tensor}, "qkv": None|"q_proj"|...}}, keys failed to match)."""
    mapping = layer_mapping(ldm_keys)
    is_sd2 = "model_transformer_resblocks" in " ".join(mapping)
    matched: dict[str, dict] = {}
    failed = []
    for key_network, weight in tensors.items():
        network_key, _, part = key_network.partition(".")
        key = convert_diffusers_name_to_compvis(network_key, is_sd2)
        target, qkv = mapping.get(key), None
        if target is None and (m := RE_X_PROJ.match(key)):
            target, qkv = mapping.get(m.group(1)), m.group(2)
        if target is None:
            failed.append(key_network)
            continue
        matched.setdefault((target, qkv), {"target": target, "qkv": qkv, "parts": {}})["parts"][part] = weight
    return {f"{t}|{q}": v for (t, q), v in matched.items()}, failed


def merged_state_dict(state_dict: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor],
                      multiplier: float) -> dict[str, torch.Tensor]:
    """The LDM weights with the LoRA's change added, as the host's Lora extension computes it."""
    matched, failed = load_network(tensors, state_dict.keys())
    assert not failed, f"the host would not match {failed[:5]}"
    out = dict(state_dict)
    for entry in matched.values():
        down, up = entry["parts"]["lora_down.weight"].double(), entry["parts"]["lora_up.weight"].double()
        rank = down.shape[0]
        alpha = float(entry["parts"]["alpha"]) if "alpha" in entry["parts"] else rank
        updown = up.reshape(up.shape[0], -1) @ down.reshape(rank, -1) * multiplier * alpha / rank
        weight = out[entry["target"]]
        if entry["qkv"] is not None:
            width = weight.shape[1]
            row = {"q_proj": 0, "k_proj": 1, "v_proj": 2}[entry["qkv"]] * width
            weight = weight.clone()
            weight[row:row + width] += updown.to(weight.dtype)
            out[entry["target"]] = weight
        else:
            assert updown.numel() == weight.numel(), (entry["target"], updown.shape, weight.shape)
            out[entry["target"]] = (weight.double() + updown.reshape(weight.shape)).to(weight.dtype)
    return out
