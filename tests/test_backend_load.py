"""load_model on tiny checkpoints matches an independent construction of the same model.

The reference is built with diffusers' own single-file converters (``diffusers.loaders.single_file_utils``)
and plain ``from_config`` + strict ``load_state_dict``: a second, independent reading of the LDM layout.
"""
from __future__ import annotations

import pytest
import torch

from extensions_lib.adapter import LatentDistribution, ModelAdapter
from extensions_lib.backend.checkpoint import open_checkpoint
from extensions_lib.backend.configs import alphas_cumprod_from_schedule, build_modules, load_config
from extensions_lib.backend.standalone import load_model
from extensions_lib.backend.tiny import tiny_config

FAMILIES = ["sd1", "sd2", "sd2-v"]


def _ldm_state_dict(path):
    with open_checkpoint(path) as reader:
        return {k: reader.take(k) for k in reader.keys()}


def _reference_modules(path, family):
    """UNet, VAE and text encoder converted by diffusers' converters, not by our keymap."""
    from diffusers.loaders import single_file_utils as conv

    sd = _ldm_state_dict(path)
    config = tiny_config(load_config(family))
    modules = build_modules(config)
    modules["unet"].load_state_dict(conv.convert_ldm_unet_checkpoint(dict(sd), config.unet), strict=True)
    modules["vae"].load_state_dict(conv.convert_ldm_vae_checkpoint(dict(sd), config.vae), strict=True)
    if family == "sd1":
        text = conv.convert_ldm_clip_checkpoint(dict(sd))
    else:
        text = conv.convert_open_clip_checkpoint(modules["text_encoder"], dict(sd))
    missing, unexpected = modules["text_encoder"].load_state_dict(text, strict=False)
    assert not unexpected and set(missing) <= {"text_model.embeddings.position_ids"}
    for m in modules.values():
        m.eval()
    return modules


@pytest.mark.parametrize("fmt", ["safetensors", "ckpt"])
@pytest.mark.parametrize("family", FAMILIES)
def test_loaded_model_matches_independent_conversion(tiny_checkpoint, family, fmt):
    path = tiny_checkpoint(family, fmt)
    model = load_model(path)
    ref = _reference_modules(path, family)
    gen = torch.Generator().manual_seed(1)

    with torch.no_grad():
        latents = torch.randn(2, 4, 8, 8, generator=gen)
        t = torch.tensor([3, 999])
        cond = torch.randn(2, 77, model.context_dim, generator=gen)
        ours = model.predict(latents, t, cond)
        theirs = ref["unet"](latents, t, encoder_hidden_states=cond).sample
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)

        images = torch.rand(1, 3, 64, 64, generator=gen) * 2 - 1
        dist = model.encode_images(images)
        ref_dist = ref["vae"].encode(images).latent_dist
        torch.testing.assert_close(dist.mode(), ref_dist.mean * 0.18215, rtol=0, atol=1e-5)
        torch.testing.assert_close(dist.std, ref_dist.std, rtol=0, atol=1e-5)
        torch.testing.assert_close(model.decode_latents(latents), ref["vae"].decode(latents / 0.18215).sample,
                                   rtol=0, atol=1e-5)

        tokens = torch.randint(0, 49408, (2, 77), generator=gen)
        ours_h = model.text_encoder(tokens, output_hidden_states=True).hidden_states
        ref_h = ref["text_encoder"](tokens, output_hidden_states=True).hidden_states
        assert len(ours_h) == len(ref_h) == 3
        for a, b in zip(ours_h, ref_h):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family,prediction", [("sd1", "eps"), ("sd2", "eps"), ("sd2-v", "v")])
def test_adapter_facts(tiny_model, family, prediction):
    model = tiny_model(family)
    assert isinstance(model, ModelAdapter)
    assert model.family == family.split("-")[0]
    assert model.prediction_type == prediction
    assert model.context_dim == 32 == model.text_encoders[0].width
    assert model.dtype == torch.float32 and model.device == torch.device("cpu")
    assert model.text_encoders[0].id_pad == (49407 if family == "sd1" else 0)
    assert model.text_encoders[0].token_embedding is model.text_encoder.text_model.embeddings.token_embedding
    assert model.text_encoders[0].token_embedding.weight.shape == (49408, 32)
    # alphas_cumprod read from the file equals the scaled-linear schedule computed independently
    expected = alphas_cumprod_from_schedule(load_config("sd1").scheduler).float()
    assert model.alphas_cumprod.dtype == torch.float32 and model.alphas_cumprod.shape == (1000,)
    torch.testing.assert_close(model.alphas_cumprod, expected, rtol=0, atol=0)
    assert not any(p.requires_grad for m in model.modules().values() for p in m.parameters())
    assert all(not p.is_meta for m in model.modules().values() for p in m.parameters())


def test_attention_modules_are_self_and_cross(tiny_model):
    model = tiny_model("sd1")
    names = dict(model.attention_modules())
    # tiny UNet: down block 0 has 2 transformers, up block 1 has 3, the mid block 1 — each attn1 + attn2
    assert len(names) == 2 * (2 + 3 + 1)
    assert {n.rsplit(".", 1)[1] for n in names} == {"attn1", "attn2"}
    for name, module in names.items():
        assert module is model.unet.get_submodule(name)
        width = module.to_k.in_features
        assert width == (32 if name.endswith("attn2") else module.to_q.in_features)


def test_latent_distribution_is_scaled(tiny_model):
    model = tiny_model("sd1")
    images = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        dist = model.encode_images(images)
    assert isinstance(dist, LatentDistribution) and dist.scale == pytest.approx(0.18215)
    assert dist.mode().shape == (1, 4, 8, 8)
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(dist.sample(gen), (dist.mean + dist.std * noise) * 0.18215)


def test_sd2_text_conditioning_matches_open_clip_tower(tiny_checkpoint, tiny_model):
    """The converted SD2 text encoder, through the adapter, equals open_clip's own transformer run on the
    untouched LDM tensors the way ldm's FrozenOpenCLIPEmbedder does (penultimate block, then ln_final)."""
    from open_clip.transformer import Transformer

    sd = _ldm_state_dict(tiny_checkpoint("sd2"))
    prefix = "cond_stage_model.model."
    width = sd[prefix + "token_embedding.weight"].shape[1]
    tower = Transformer(width, layers=2, heads=2, mlp_ratio=2.0)
    tower.load_state_dict({k[len(prefix + "transformer."):]: v for k, v in sd.items()
                           if k.startswith(prefix + "transformer.")}, strict=True)
    ln_final = torch.nn.LayerNorm(width)
    ln_final.load_state_dict({"weight": sd[prefix + "ln_final.weight"], "bias": sd[prefix + "ln_final.bias"]})

    gen = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, 49408, (2, 77), generator=gen)
    with torch.no_grad():
        x = sd[prefix + "token_embedding.weight"][tokens] + sd[prefix + "positional_embedding"]
        x = x.permute(1, 0, 2)                       # open_clip 2.20 blocks take (L, N, D)
        mask = torch.full((77, 77), float("-inf")).triu_(1)
        for block in tower.resblocks[:-1]:           # layer="penultimate"
            x = block(x, attn_mask=mask)
        expected = ln_final(x.permute(1, 0, 2))
        got = tiny_model("sd2").encode_token_chunks(tokens)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_offload_keeps_results(tiny_checkpoint, tiny_model):
    model = load_model(tiny_checkpoint("sd1"), offload=True)
    ref = tiny_model("sd1")
    x, t, c = torch.randn(1, 4, 8, 8), torch.tensor([7]), torch.randn(1, 77, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.predict(x, t, c), ref.predict(x, t, c), rtol=0, atol=0)
    with pytest.raises(ValueError):
        with model.use("unet", "refiner"):
            pass


def test_offload_moves_each_part_only_when_needed_and_nested_blocks_keep_the_outer_part(tiny_checkpoint,
                                                                                         monkeypatch):
    model = load_model(tiny_checkpoint("sd1"), offload=True)
    model.device = torch.device("cuda")  # only where the parts should go; `.to` is recorded, not run
    moves = []
    for name, module in model.modules().items():
        monkeypatch.setattr(module, "to", lambda device, name=name: moves.append((name, torch.device(device).type)))

    with model.use("unet"):
        assert moves == [("unet", "cuda")]
        for _ in range(3):  # a sampling loop's predict() calls
            with model.use("unet"):
                pass
        with model.use("vae"):  # a preview decode inside: the UNet stays
            pass
        assert moves == [("unet", "cuda"), ("vae", "cuda")]
    moves.clear()
    with model.use("text_encoder"):  # the next step's prompt encoding evicts both, before moving in
        pass
    assert moves[-1] == ("text_encoder", "cuda") and sorted(moves[:-1]) == [("unet", "cpu"), ("vae", "cpu")]


@pytest.mark.parametrize("family", FAMILIES)
def test_ldm_state_dict_reproduces_the_file(tiny_checkpoint, tiny_model, family):
    """What a saver (DreamBooth) writes back from a loaded model is the file it came from, bit for bit."""
    original = _ldm_state_dict(tiny_checkpoint(family))
    saved = dict(tiny_model(family).ldm_state_dict())
    assert sorted(saved) == sorted(original)
    for key, tensor in original.items():
        assert saved[key].dtype == tensor.dtype and torch.equal(saved[key], tensor), key
