"""APT's parts against independent computations: the CFG-scale field, mask weights, the guided loss's
gradients (autograd against finite differences on a hand-built model), one fused UNet call against two,
decoder checkpointing (same gradients, undone exactly), and the pair's files in the host's reader."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extensions_lib.apt.att_mask import grey_to_weight, is_mask_file, load_mask_weight, mask_path
from extensions_lib.apt.cfg_scale import parse_cfg_scale
from extensions_lib.apt.create import create_pair
from extensions_lib.apt.data import name_pattern
from extensions_lib.apt.decoder_checkpoint import checkpointed_decoder
from extensions_lib.apt.guided import apt_loss, guided_prediction
from extensions_lib.apt.options import AptCreateOptions
from extensions_lib.errors import AlchemyError
from extensions_lib.formats.embedding import read_embedding
from extensions_lib.formats.host_pt_rules import check_host_loadable
from extensions_lib.prompt import encode_prompts
from extensions_lib.train.dataset import scan_folder
from extensions_lib.train.diffusion_loss import add_noise
from host_pt_reference import host_read_pt_embedding
from train_fakes import scaled_linear_alphas_cumprod


# ---- the CFG-scale field ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, curve", [("1.5-3", lambda r: r), ("1.5-3:ln", lambda r: r),
                                         ("1.5 - 3 : cos", lambda r: math.cos((r - 1) * math.pi / 2)),
                                         ("1.5-3:cos2", lambda r: 1 - math.cos(r * math.pi / 2)),
                                         ("1.5-3:sqrt", math.sqrt)])
def test_cfg_schedules_follow_dreamartists_formulas(text, curve):
    cfg = parse_cfg_scale(text)
    t = torch.tensor([0, 1, 250, 500, 999])
    expected = [1.5 + 1.5 * curve(v / 999) for v in t.tolist()]
    assert cfg.at(t).tolist() == pytest.approx(expected, abs=1e-6)
    assert cfg.mean() == pytest.approx(sum(1.5 + 1.5 * curve(v / 999) for v in range(1000)) / 1000, abs=1e-5)


def test_constant_cfg_and_rejections():
    assert parse_cfg_scale(" 3.0 ").at(torch.tensor([0, 999])).tolist() == [3.0, 3.0]
    assert parse_cfg_scale("1-3").low == 1.0  # 1 at one end is fine
    for bad, words in [("1", "learn nothing"), ("1.0-1", "learn nothing"), ("0.5", "outside"), ("31", "outside"),
                       ("nan", "outside"), ("2-3:torch.sqrt(rate)", "not a scale"),
                       ("2-3:__import__", "unknown curve"), ("2-3:exp", "unknown curve"), ("", "not a scale"),
                       ("__import__('os').system('x')", "not a scale")]:
        with pytest.raises(AlchemyError, match="cfg_scale") as info:
            parse_cfg_scale(bad)
        assert words in info.value.message, (bad, info.value.message)


# ---- attention masks ---------------------------------------------------------------------------------------------

def test_mask_grey_levels_map_to_dreamartists_weights():
    grey = np.array([0, 127, 128, 191, 255], dtype=np.uint8)
    assert grey_to_weight(grey).tolist() == pytest.approx([0, 1, 1 + 4 / 128, 3, 5])


def test_mask_files_are_found_weighted_at_latent_size_and_never_training_images(tmp_path):
    for stem in ("a", "b"):
        Image.new("RGB", (96, 64), (10, 200, 30)).save(tmp_path / f"{stem}.png")
    left_white = np.zeros((64, 96), np.uint8)
    left_white[:, :48] = 255
    Image.fromarray(left_white).save(tmp_path / "a_att.png")
    Image.new("L", (96, 64), 60).save(tmp_path / "a_att_proc.png")
    dataset = scan_folder(tmp_path, width=96, height=64, exclude=is_mask_file)
    assert [e.path.name for e in dataset.entries] == ["a.png", "b.png"]
    assert mask_path(tmp_path / "a.png") == tmp_path / "a_att.png" and mask_path(tmp_path / "b.png") is None
    weight = load_mask_weight(tmp_path / "a_att.png", (96, 64))
    assert weight.shape == (1, 8, 12)  # (h, w) of the latent of a 96x64 image
    assert torch.all(weight[:, :, :5] == 5) and torch.all(weight[:, :, 7:] == 0)
    (tmp_path / "c_att.png").write_bytes(b"not an image")
    with pytest.raises(AlchemyError, match="attention mask") as info:
        load_mask_weight(tmp_path / "c_att.png", (96, 64))
    assert info.value.path.endswith("c_att.png")


def test_negative_prompt_replaces_the_name_as_a_word_only():
    pattern = name_pattern("cat.x")
    assert pattern.sub("cat.x-neg", "a cat.x, cat.xy cat.x-neg (cat.x:1.2) bcat.x") == \
        "a cat.x-neg, cat.xy cat.x-neg (cat.x-neg:1.2) bcat.x"


# ---- the guided loss ---------------------------------------------------------------------------------------------

class LinearModel:
    """A hand-built denoiser: output = a·x_t + (mean over tokens of cond) @ P, broadcast over the image."""

    prediction_type = "eps"

    def __init__(self, width=5, channels=3, dtype=torch.float64):
        g = torch.Generator().manual_seed(0)
        self.a = 0.3
        self.P = torch.randn(width, channels, generator=g, dtype=dtype)
        self.alphas_cumprod = scaled_linear_alphas_cumprod()
        self.device = torch.device("cpu")
        self.calls = []

    def predict(self, noisy, t, cond):
        self.calls.append(noisy.shape[0])
        return self.a * noisy + (cond.mean(dim=1) @ self.P)[:, :, None, None]


def test_negative_gets_the_opposite_gradient_for_s_above_1_matching_finite_differences():
    model = LinearModel()
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    vpos = torch.randn(1, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    vneg = torch.randn(1, 6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([100, 700])
    noise_seed = 7

    context = torch.randn(1, 8, 5, generator=g, dtype=torch.float64)  # the prompt's other tokens

    def loss_of(pos, neg, s):
        # Each embedding spliced into the same 8-token prompt, as the text encoder's input would be.
        cond_pos = torch.cat([pos, context[:, pos.shape[1]:]], dim=1).expand(2, -1, -1)
        cond_neg = torch.cat([neg, context[:, neg.shape[1]:]], dim=1).expand(2, -1, -1)
        gen = torch.Generator().manual_seed(noise_seed)
        return apt_loss(model, latents, cond_neg, cond_pos, parse_cfg_scale(s), generator=gen, timesteps=t)

    for s in ("3", "1.5-4"):
        loss = loss_of(vpos, vneg, s)
        grad_pos, grad_neg = torch.autograd.grad(loss, [vpos, vneg])
        # Central finite differences for a few coordinates of each embedding: exact up to rounding, since the loss
        # is quadratic in the vectors here (the loss is computed in float32, hence the step and tolerance).
        for vec, grad, other in ((vpos, grad_pos, "pos"), (vneg, grad_neg, "neg")):
            for index in [(0, 0, 0), (0, 1, 3), (0, vec.shape[1] - 1, 2)]:
                bumped = []
                for h in (1e-2, -1e-2):
                    v = vec.detach().clone()
                    v[index] += h
                    bumped.append(float(loss_of(v, vneg.detach(), s) if other == "pos" else loss_of(vpos.detach(), v, s)))
                assert grad[index].item() == pytest.approx((bumped[0] - bumped[1]) / 2e-2, rel=2e-3, abs=1e-6)
        # d loss/d e_neg = (1 - s)·g and d loss/d e_pos = s·g (g = d loss/d guided): every token of the negative
        # gets a gradient pointing against the positive's when every s > 1, exactly (1 - s)/s of it for constant s.
        assert torch.all((grad_pos[0, :1] * grad_neg[0, :1]).sum(-1) < 0)
        if s == "3":
            assert torch.allclose(grad_neg[0, :3], (1 - 3) / 3 * grad_pos[0, :3], rtol=1e-5, atol=1e-9)


def test_fused_call_equals_two_calls_on_the_tiny_model(tiny_model):
    model = tiny_model("sd1")
    g = torch.Generator().manual_seed(2)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        cond = encode_prompts(model, ["a dog", "a cat", "a photo", "a painting"])
    t = torch.tensor([30, 800])
    noisy = add_noise(latents, torch.randn(latents.shape, generator=g), t, model.alphas_cumprod)
    scale = torch.tensor([3.0, 2.0])
    with torch.no_grad():
        fused = guided_prediction(model, noisy, t, cond[:2], cond[2:], scale)
        naive = guided_prediction(model, noisy, t, cond[:2], cond[2:], scale, fused=False)
        e_neg, e_pos = model.predict(noisy, t, cond[:2]), model.predict(noisy, t, cond[2:])
    assert torch.allclose(fused, naive, atol=1e-5)
    assert torch.allclose(naive, e_neg + scale[:, None, None, None] * (e_pos - e_neg), atol=1e-6)


# ---- reconstruction: decoder checkpointing ------------------------------------------------------------------------

def test_decoder_checkpointing_keeps_gradients_and_is_undone_exactly(tiny_model):
    model = tiny_model("sd1")
    vae = model.modules()["vae"]
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(1, 4, 8, 8, generator=g)
    pixels = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1

    def run():
        x = x0.clone().requires_grad_(True)
        loss = (model.decode_latents(x) - pixels).abs().mean()
        loss.backward()
        return loss.detach(), x.grad

    plain_loss, plain_grad = run()
    with checkpointed_decoder(vae) as blocks:
        assert len(blocks) >= 4 and all("forward" in vars(b) for b in blocks)
        loss, grad = run()
    assert torch.allclose(loss, plain_loss) and torch.allclose(grad, plain_grad, atol=1e-6)
    assert not any("forward" in vars(m) for m in vae.modules())


# ---- the pair's files -----------------------------------------------------------------------------------------------

def test_created_pair_loads_in_the_hosts_reader_with_noise_only_on_the_negative(tiny_model, tmp_path):
    model = tiny_model("sd1")
    pos_path, neg_path = create_pair(model, AptCreateOptions(name="zq-style", init_text="photo", init_text_neg="photo",
                                                             seed=4), directory=tmp_path)
    assert (pos_path.name, neg_path.name) == ("zq-style.pt", "zq-style-neg.pt")
    weight = model.text_encoders[0].token_embedding.weight
    photo = weight[model.tokenizer.tokenize(["photo"])[0][0]].detach()
    for path, count in ((pos_path, 3), (neg_path, 6)):
        assert check_host_loadable(path) == []
        name, vec, vectors, shape, step, *_ = host_read_pt_embedding(path)
        assert (name, vectors, shape, step) == (path.stem, count, weight.shape[1], 0)
        diff = (vec - photo).abs()
        if count == 3:
            assert torch.equal(vec, photo.expand(3, -1))
        else:
            assert 0 < diff.std() < 3e-3 and diff.max() < 1e-2  # sigma 1e-3
    with pytest.raises(AlchemyError, match="already exists"):  # neither file is touched
        create_pair(model, AptCreateOptions(name="zq-style"), directory=tmp_path)
    before = neg_path.read_bytes()
    with pytest.raises(AlchemyError, match="zq-style-neg"):
        (tmp_path / "other").mkdir()
        (tmp_path / "other" / "zq-style-neg.pt").write_bytes(before)
        create_pair(model, AptCreateOptions(name="zq-style"), directory=tmp_path / "other")
    assert not (tmp_path / "other" / "zq-style.pt").exists()
    st_pos, st_neg = create_pair(model, AptCreateOptions(name="zq2", file_format="safetensors"), directory=tmp_path)
    assert st_pos.suffix == st_neg.suffix == ".safetensors"
    assert read_embedding(st_neg).num_vectors == 6 and read_embedding(st_pos).name == "zq2"


def test_innermost_blocks_of_an_ldm_shaped_decoder():
    """The WebUI's ldm Decoder nests ``up[i].block[j]`` / ``up[i].attn[j]`` (called) inside ``up[i]`` (a plain
    container, never called): only the called blocks are checkpointed."""
    from torch import nn

    from extensions_lib.apt.decoder_checkpoint import innermost_blocks

    def level():
        holder = nn.Module()
        holder.block = nn.ModuleList([nn.Conv2d(2, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1)])
        holder.attn = nn.ModuleList([nn.Identity()])
        holder.upsample = nn.Upsample(scale_factor=2)
        return holder

    decoder = nn.Module()
    decoder.mid = nn.Conv2d(2, 2, 1)
    decoder.up = nn.ModuleList([level(), level()])
    blocks = innermost_blocks(decoder)
    expected = [m for lvl in decoder.up for m in (*lvl.block, *lvl.attn)]
    assert len(blocks) == 6 and {id(b) for b in blocks} == {id(m) for m in expected}
