"""LDM <-> diffusers key mapping: exact round trips, and agreement with diffusers' own converters."""
from __future__ import annotations

import pytest
import torch

from extensions_lib.backend import keymap
from extensions_lib.backend.checkpoint import open_checkpoint
from extensions_lib.backend.configs import build_modules, load_config
from extensions_lib.backend.tiny import tiny_config

FAMILIES = ["sd1", "sd2", "sd2-v"]


def _ldm_state_dict(path):
    with open_checkpoint(path) as reader:
        return {k: reader.take(k) for k in reader.keys()}


def _assert_bit_identical(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("family", FAMILIES)
def test_ldm_diffusers_ldm_is_bit_identical(tiny_checkpoint, family):
    sd = _ldm_state_dict(tiny_checkpoint(family))
    # keys real files carry that have no diffusers counterpart, in odd dtypes
    sd["model_ema.decay"] = torch.tensor(0.9999)
    sd["model_ema.num_updates"] = torch.tensor(1234, dtype=torch.int32)
    sd["model_ema.diffusion_modelout2weight"] = torch.randn(4, 32, 3, 3).half()
    sd["logvar"] = torch.zeros(1000)
    layout = keymap.Layout.from_config(tiny_config(load_config(family)))

    parts = keymap.convert_ldm_state_dict(sd, layout)
    assert {"model_ema.decay", "model_ema.num_updates", "alphas_cumprod", "betas", "logvar"} <= set(parts["extra"])
    if family == "sd1":
        assert set(parts["extra"]) >= {"cond_stage_model.transformer.text_model.embeddings.position_ids"}
    else:
        assert {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} <= set(parts["extra"])
    # every key of the tiny modules is produced, and nothing else outside "extra"
    for name, module in build_modules(tiny_config(load_config(family))).items():
        expected = set(module.state_dict()) - {"text_model.embeddings.position_ids"}
        assert set(parts[name]) == expected, name

    back = keymap.convert_diffusers_state_dicts(parts, layout)
    _assert_bit_identical(back, sd)


@pytest.mark.parametrize("family", FAMILIES)
def test_diffusers_ldm_diffusers_is_exact(family):
    config = tiny_config(load_config(family))
    layout = keymap.Layout.from_config(config)
    gen = torch.Generator().manual_seed(3)
    parts = {name: {k: torch.randn(v.shape, generator=gen) for k, v in m.state_dict().items()
                    if k != "text_model.embeddings.position_ids"}
             for name, m in build_modules(config).items()}
    parts["extra"] = {}
    ldm = keymap.convert_diffusers_state_dicts(parts, layout)
    again = keymap.convert_ldm_state_dict(ldm, layout)
    assert not again["extra"]
    for name in keymap.COMPONENTS:
        _assert_bit_identical(again[name], parts[name])


def test_streaming_conversion_makes_views_not_copies():
    layout = keymap.Layout.from_config(load_config("sd2"))
    w = torch.randn(3 * 8, 8)
    pieces = list(keymap.iter_ldm_to_diffusers(
        [("cond_stage_model.model.transformer.resblocks.5.attn.in_proj_weight", w)], layout))
    assert [(c, k) for c, k, _ in pieces] == [
        ("text_encoder", f"text_model.encoder.layers.5.self_attn.{x}_proj.weight") for x in "qkv"]
    for i, (_, _, t) in enumerate(pieces):
        assert t.untyped_storage().data_ptr() == w.untyped_storage().data_ptr()
        assert torch.equal(t, w[8 * i: 8 * (i + 1)])
    conv = torch.randn(16, 16, 1, 1)
    [(c, k, t)] = keymap.iter_ldm_to_diffusers([("first_stage_model.decoder.mid.attn_1.proj_out.weight", conv)],
                                               keymap.Layout())
    assert (c, k) == ("vae", "decoder.mid_block.attentions.0.to_out.0.weight")
    assert t.shape == (16, 16) and t.data_ptr() == conv.data_ptr()


def test_known_key_pairs():
    """Anchors from the published SD1.5 layout (independent of the table's arithmetic)."""
    layout = keymap.Layout.from_config(load_config("sd1"))
    expect = {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight":
            ("unet", "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"),
        "model.diffusion_model.input_blocks.6.0.op.weight": ("unet", "down_blocks.1.downsamplers.0.conv.weight"),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.bias": ("unet", "down_blocks.3.resnets.1.conv2.bias"),
        "model.diffusion_model.output_blocks.2.1.conv.weight": ("unet", "up_blocks.0.upsamplers.0.conv.weight"),
        "model.diffusion_model.output_blocks.5.2.conv.bias": ("unet", "up_blocks.1.upsamplers.0.conv.bias"),
        "model.diffusion_model.output_blocks.11.1.proj_out.weight": ("unet", "up_blocks.3.attentions.2.proj_out.weight"),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": ("unet", "mid_block.resnets.1.time_emb_proj.weight"),
        "model.diffusion_model.time_embed.2.bias": ("unet", "time_embedding.linear_2.bias"),
        "first_stage_model.decoder.up.3.block.2.nin_shortcut.weight": ("vae", "decoder.up_blocks.0.resnets.2.conv_shortcut.weight"),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": ("vae", "decoder.up_blocks.3.resnets.0.conv_shortcut.weight"),
        "first_stage_model.encoder.down.2.downsample.conv.weight": ("vae", "encoder.down_blocks.2.downsamplers.0.conv.weight"),
        "first_stage_model.encoder.mid.attn_1.norm.bias": ("vae", "encoder.mid_block.attentions.0.group_norm.bias"),
        "first_stage_model.encoder.norm_out.weight": ("vae", "encoder.conv_norm_out.weight"),
        "first_stage_model.quant_conv.weight": ("vae", "quant_conv.weight"),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.bias":
            ("text_encoder", "text_model.encoder.layers.11.mlp.fc2.bias"),
        # transformers < 4.17 layout, renamed as the WebUI does
        "cond_stage_model.transformer.encoder.layers.3.self_attn.q_proj.weight":
            ("text_encoder", "text_model.encoder.layers.3.self_attn.q_proj.weight"),
    }
    for ldm, (component, key) in expect.items():
        [piece] = keymap.ldm_to_diffusers(ldm, layout)
        assert (piece.component, piece.key) == (component, key), ldm
    sd2 = keymap.Layout.from_config(load_config("sd2"))
    [piece] = keymap.ldm_to_diffusers("cond_stage_model.model.transformer.resblocks.23.mlp.c_proj.weight", sd2)
    assert (piece.component, piece.key) == ("text_encoder", "text_model.encoder.layers.23.mlp.fc2.weight")
    [piece] = keymap.ldm_to_diffusers("cond_stage_model.model.positional_embedding", sd2)
    assert piece.key == "text_model.embeddings.position_embedding.weight"
    with pytest.raises(KeyError):
        keymap.diffusers_to_ldm("unet", "no_such_block.weight", layout)


def _meta_parts(config):
    with torch.device("meta"):
        modules = build_modules(config)
    return {name: {k: v for k, v in m.state_dict().items() if k != "text_model.embeddings.position_ids"}
            for name, m in modules.items()}


@pytest.mark.parametrize("family", ["sd1", "sd2"])
def test_full_size_layout_agrees_with_diffusers_converters(family):
    """At real SD sizes (meta tensors, no memory): our diffusers -> LDM keys, read back by diffusers' own
    single-file converters, give every diffusers key at its original shape."""
    from diffusers.loaders import single_file_utils as conv

    config = load_config(family)
    layout = keymap.Layout.from_config(config)
    parts = _meta_parts(config)
    ldm = keymap.convert_diffusers_state_dicts({**parts, "extra": {}}, layout)
    assert len([k for k in ldm if k.startswith("cond_stage_model.")]) == (
        196 if family == "sd1" else 4 + 12 * 24)      # SD1 CLIP-L; SD2 keeps all 24 OpenCLIP blocks
    checks = {"unet": conv.convert_ldm_unet_checkpoint(dict(ldm), config.unet),
              "vae": conv.convert_ldm_vae_checkpoint(dict(ldm), config.vae)}
    if family == "sd1":
        checks["text_encoder"] = conv.convert_ldm_clip_checkpoint(dict(ldm))
    else:
        with torch.device("meta"):
            text_model = build_modules(config)["text_encoder"]
        checks["text_encoder"] = conv.convert_open_clip_checkpoint(text_model, dict(ldm))
    for name, converted in checks.items():
        expected = set(parts[name])
        if name == "text_encoder" and family == "sd2":   # diffusers drops the last OpenCLIP block; we keep it
            expected = {k for k in expected if not k.startswith("text_model.encoder.layers.23.")}
        assert set(converted) == expected, name
        for key, tensor in converted.items():
            assert tuple(tensor.shape) == tuple(parts[name][key].shape), (name, key)
